"""``gram-plugin meta-train --dassl-config ...``: meta-train an init THROUGH the user's own Dassl trainer.

Run from the root of a CoOp-style fork (its ``train.py`` defines ``extend_cfg`` and imports the
datasets and trainers it registers)::

    gram-plugin meta-train --dassl-config configs/trainers/CoOp/vit_b16_ctxv1.yaml \\
        --dataset-config configs/datasets/caltech101.yaml --trainer CoOp --root $DATA --out runs/gram_init

What it does, in the fork's own terms, once :func:`gram_plugin.cli.plan.plan` has checked every option
(files, fork, flags, dependencies; nothing imported or loaded yet):

1. builds the config as the fork's ``train.py`` does (``get_cfg_default``, ``extend_cfg``, the two
   yaml files, trailing ``KEY VALUE`` options), then forces what meta-training needs: the base
   classes (``DATASET.SUBSAMPLE_CLASSES base``), ``--shots`` images per class, ``PREC fp32``
   (second-order gradients), ``GRAM.ENABLED False``;
2. ``build_trainer(cfg)``: the trainer, its CLIP and its data exactly as training would build them;
3. draws ``--tasks`` from the trainer's own few-shot base-class training set (the images decoded
   once, :func:`decoded_once_dataset`);
4. meta-learns every prompt tensor of the trainer with the library function
   :func:`gram_plugin.adapters.meta.meta_train` (MAML with meta-gradient clipping, plus GRAM's
   regulator with ``--method gram``), checkpoints in ``OUT/meta``, ``--resume``;
5. writes ``OUT/init.safetensors``, keyed by the trainer's own parameter names, which
   ``wrap(trainer, init=..., regulator=True)`` or ``GRAM.INIT`` loads.

The frozen CLIP and tokenizer come from the trainer's module (the adapter says which,
:meth:`DasslAdapter.frozen_clip`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .options import CLIError, DasslConfig
from .pipeline import open_run, task_source
from .plan import plan

def load_fork(fork: Path):
    """Import the fork's ``train.py`` (registering its datasets and trainers); return the module.

    Raises ``CLIError`` when it defines no ``extend_cfg``."""
    train_py = fork / "train.py"
    if str(fork) not in sys.path:
        sys.path.insert(0, str(fork))
    spec = importlib.util.spec_from_file_location("_gram_fork_train", train_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports the fork's datasets and trainers: registers them
    if not hasattr(module, "extend_cfg"):
        raise CLIError(f"{train_py} defines no extend_cfg(cfg)")
    return module


def build_cfg(dassl: DasslConfig, shots: int, seed: int, fork_train, trainer_cls):
    """The trainer's config as the fork's ``train.py`` builds it, plus what meta-training needs (frozen)."""
    from dassl.config import get_cfg_default

    from ..adapters.base import adapter_class
    from ..adapters.config import add_gram_cfg

    adapter_cls = adapter_class(trainer_cls)
    cfg = get_cfg_default()
    fork_train.extend_cfg(cfg)
    if not hasattr(cfg, "GRAM"):
        add_gram_cfg(cfg)
    cfg.merge_from_file(dassl.dataset_config)
    cfg.merge_from_file(dassl.dassl_config)
    if dassl.root:
        cfg.DATASET.ROOT = dassl.root
    cfg.TRAINER.NAME = dassl.trainer
    cfg.SEED = seed
    cfg.merge_from_list(list(dassl.opts))
    if dassl.clip_weights:  # --clip-weights beats a GRAM.CLIP_WEIGHTS among the KEY VALUE options
        cfg.GRAM.CLIP_WEIGHTS = dassl.clip_weights
    # what the adapter says its trainer needs for meta-training (PREC fp32: second-order gradients)
    forced = [("DATASET.SUBSAMPLE_CLASSES", "base"), ("DATASET.NUM_SHOTS", shots), ("GRAM.ENABLED", False),
              *adapter_cls.meta_train_cfg(cfg)]
    for key, value in forced:
        obj = cfg
        *path, last = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    cfg.freeze()
    return cfg


def decoded_once_dataset(items, classnames, size: int, mean, std, name: str, cache: bool = True):
    """An ``ImageDataset`` whose images are decoded, resized (bicubic) and centre-cropped once and
    kept as uint8 (3 * size * size bytes each), then scaled and normalised on every access: the
    values equal those of ``Resize, CenterCrop, ToTensor, Normalize`` applied each time. Tasks draw
    the same few-shot images again and again, so decoding them once saves most of that work.

    Args:
        items / classnames / name: the ``ImageDataset``'s.
        size: the trainer's input size (``INPUT.SIZE``); mean / std: its ``PIXEL_MEAN`` / ``PIXEL_STD``.
        cache: ``False`` decodes every access (``--no-image-cache``).
    """
    import torch
    from torchvision import transforms as T

    from ..data import ImageDataset

    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    class DecodedOnce(ImageDataset):
        def load_image(self, i: int):
            pixels = self._decoded.get(i) if cache else None
            if pixels is None:
                pixels = super().load_image(i)
                if cache:
                    self._decoded[i] = pixels
            return (pixels.to(torch.float32).div(255) - mean_t) / std_t

    ds = DecodedOnce(items, classnames, T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                                                   T.CenterCrop(size), T.PILToTensor()]), name=name)
    ds._decoded = {}
    return ds


def pool_problem(tasks, train_x, cfg) -> str | None:
    """Why the few-shot base-class images the trainer built cannot fill ``--tasks`` (in the flags' words), or None.

    Checked on the images themselves: ``DATASET.NUM_SHOTS`` keeps every image of a class that has fewer
    (ImageNet-mini: 10), so ``--shots`` alone does not tell."""
    from collections import Counter

    counts = Counter(x.label for x in train_x)
    if not counts:
        return f"{cfg.DATASET.NAME}: no base-class training images under DATASET.ROOT {cfg.DATASET.ROOT}"
    most = max(counts.values())
    if tasks.tasks == "per-dataset":
        need, want, what = tasks.k_support + 1, len(counts), f"--k-support {tasks.k_support} + 1 query image"
    else:
        need, want = tasks.k_support + tasks.k_query, tasks.n_way
        what = f"--k-support {tasks.k_support} + --k-query {tasks.k_query} = {need} images"
    enough = sum(n >= need for n in counts.values())
    if enough >= want:
        return None
    half = max(1, most // 2)
    return (f"{what} per class, but only {enough} of the {len(counts)} base classes of {cfg.DATASET.NAME} have that "
            f"many (DATASET.NUM_SHOTS {cfg.DATASET.NUM_SHOTS} found at most {most} images a class) and the tasks need "
            f"{want}: draw smaller tasks, e.g. --shots {most} --k-support {half} --k-query {most - half}")


def meta_train_through_dassl(args) -> int:
    """The Dassl path of ``meta-train``: check, build the fork's trainer, meta-train, write the run folder."""
    p = plan(args)  # everything checked before the fork, Dassl or any model is loaded
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dassl = p.dassl
    with open_run(args) as run:
        fork = Path(dassl.fork).resolve()
        fork_train = load_fork(fork)
        from dassl.engine import TRAINER_REGISTRY, build_trainer

        from ..adapters.base import adapter_class
        from ..adapters.compat import clip_weights_already_said, patch_dassl
        from ..adapters.meta import meta_train
        from ..data import Item

        patch_dassl(checkpoints=False)  # Dassl's warm-up schedulers on torch >= 2.6 (this process only)
        if dassl.trainer not in TRAINER_REGISTRY.registered_names():
            raise CLIError(f"trainer {dassl.trainer!r} is not registered by {fork / 'train.py'}; registered: "
                           f"{', '.join(sorted(TRAINER_REGISTRY.registered_names()))}")
        trainer_cls = TRAINER_REGISTRY.get(dassl.trainer)
        cfg = build_cfg(dassl, p.data.shots, args.seed, fork_train, trainer_cls)
        from dassl.utils import set_random_seed

        # seeded as the fork's train.py seeds before build_trainer: the split files CoOp writes into
        # DATASET.ROOT, the few-shot subset and the trainer's own random init are then those of --seed
        set_random_seed(cfg.SEED)
        trainer = build_trainer(cfg)
        adapter = adapter_class(trainer_cls)(trainer)
        ds = trainer.dm.dataset
        with clip_weights_already_said():  # the CLIP build_trainer loaded (and named), once more, prompt-free
            clip_model = adapter.frozen_clip()
        if p.tasks.corpus is not None:  # GRAM's tasks from an image-caption corpus, as the trainer's input
            tasks = corpus_task_source_for_trainer(p, run, cfg, clip_model, resume=args.resume, quiet=args.quiet)
        else:
            problem = pool_problem(p.tasks, ds.train_x, cfg)
            if problem:
                raise CLIError(problem)
            images = decoded_once_dataset([Item(x.impath, x.label) for x in ds.train_x], ds.classnames,
                                          cfg.INPUT.SIZE[0], cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, cfg.DATASET.NAME,
                                          cache=dassl.image_cache)
            tasks = task_source(p.tasks, p.data.shots, images)
        gram = args.method == "gram"
        init = meta_train(trainer, tasks, p.meta, clip_model=clip_model,
                          tokenize=adapter.tokenizer(), regulator=gram or None, run_dir=run.path("meta"),
                          resume=args.resume, adapter=adapter,
                          metadata={"backbone": cfg.MODEL.BACKBONE.NAME, "dataset": cfg.DATASET.NAME,
                                    "dassl_config": str(dassl.dassl_config), "base_classes": len(ds.classnames),
                                    **({"clip_weights": cfg.GRAM.CLIP_WEIGHTS} if cfg.GRAM.CLIP_WEIGHTS else {})})
        out = init.save(run.path("init.safetensors"), overwrite=True)
        run.write_metrics({key: init.metadata.get(key) for key in ("method_name", "meta_steps", "skipped_steps")})
        run.log(f"{init.metadata['method_name']}: wrote {out} ({', '.join(init.tensors)}; "
                f"{'with' if gram else 'no'} regulator; {init.metadata.get('meta_steps')} steps)")
        run.log(f'load it in train.py with  wrap(trainer, init="{out}"{", regulator=True" if gram else ""})  '
                f"or the options  GRAM.ENABLED True GRAM.INIT {out}")
    return 0


def corpus_task_source_for_trainer(p, run, cfg, clip_model, resume: bool = False, quiet: bool = False):
    """``--tasks chc:CORPUS`` through the trainer: the corpus images preprocessed as the trainer's input
    (``INPUT.SIZE``, its pixel mean / std; decoded once), their features from the trainer's own frozen CLIP
    image tower (cached in OUT/feature_cache) for CHC's visual domains, and the task source drawing those
    images. The hierarchy, its report and picture go into the run folder."""
    from ..backbones.openclip import _state_digest
    from ..cache import FeatureCache
    from ..chc import ImageTower
    from ..data import Item
    from .corpus import corpus_hierarchy, corpus_task_source

    corpus, size = p.corpus, cfg.INPUT.SIZE[0]
    mean, std = list(cfg.INPUT.PIXEL_MEAN), list(cfg.INPUT.PIXEL_STD)
    images = decoded_once_dataset([Item(path, 0) for path in corpus.image_paths], ["image"], size, mean, std,
                                  f"corpus-{corpus.root.name}", cache=p.dassl.image_cache)
    tower = ImageTower(clip_model.encode_image, f"dassl-{cfg.MODEL.BACKBONE.NAME}-{size}px-mean{mean}-std{std}",
                       _state_digest(clip_model.visual))
    cache_dir = run.path("feature_cache")
    features = FeatureCache(cache_dir, progress=not quiet).features(tower, images)
    result = corpus_hierarchy(p, run, cache_dir, features=features, resume=resume,
                              features_from={"backbone": tower.name, "weights": tower.weights_id()})
    return corpus_task_source(p, result, dataset=images)
