"""``gram-plugin meta-train --dassl-config ...``: meta-train an init THROUGH the user's own Dassl trainer.

Run from the root of a CoOp-style fork (its ``train.py`` defines ``extend_cfg`` and imports the
datasets and trainers it registers)::

    gram-plugin meta-train --dassl-config configs/trainers/CoOp/vit_b16_ctxv1.yaml \\
        --dataset-config configs/datasets/caltech101.yaml --trainer CoOp --root $DATA \\
        --out inits/coop_caltech101.safetensors

What it does, in the fork's own terms:

1. builds the config as the fork's ``train.py`` does (``get_cfg_default``, ``extend_cfg``, the two
   yaml files, trailing ``KEY VALUE`` options), then forces what meta-training needs: the base
   classes (``DATASET.SUBSAMPLE_CLASSES base``), ``--shots`` images per class, ``PREC fp32``
   (second-order gradients), ``GRAM.ENABLED False``;
2. ``build_trainer(cfg)``: the trainer, its CLIP and its data exactly as training would build them;
3. draws tasks from the trainer's own few-shot base-class training set: ``--tasks n-way``
   (``--n-way`` classes, ``--k-support`` + ``--k-query`` images each; every task has its own class
   set) or ``--tasks per-dataset`` (MAML + clipping's tasks: all classes, ``--shots`` images each,
   ``--k-support`` of them support);
4. meta-learns every prompt tensor of the trainer (:func:`gram_plugin.adapters.meta.meta_train`:
   MAML with meta-gradient clipping, plus GRAM's regulator unless ``--no-regulator``) with a progress
   bar, checkpoints every ``--checkpoint-every`` steps in ``--run-dir`` and ``--resume``;
5. writes the ``PromptInit`` ``.safetensors`` that ``wrap(trainer, init=..., regulator=True)`` or
   ``GRAM.INIT`` loads, keyed by the trainer's own parameter names.

The frozen CLIP and tokenizer come from the trainer's module (``load_clip_to_cpu``, ``clip.tokenize``;
the adapter says which, :meth:`DasslAdapter.frozen_clip`). Defaults of the meta-training
hyper-parameters are :class:`gram_plugin.meta.MetaConfig`'s.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from .base import AdapterError, adapter_class

DASSL_INSTALL = (
    "install the adapters' extra and Dassl into the fork's environment: "
    "pip install \"/path/to/gram-plugin[dassl]\" and pip install --no-build-isolation --no-deps -e /path/to/Dassl.pytorch "
    "(see examples/coop_fork/README.md)"
)


class MetaTrainCommandError(RuntimeError):
    """The command cannot run as asked (missing dependency, fork, file or option)."""


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise MetaTrainCommandError(f"meta-train --dassl-config needs {what} ({e.name} is not installed): {DASSL_INSTALL}") from None


def build_parser() -> argparse.ArgumentParser:
    from gram_plugin.meta import MetaConfig

    d = MetaConfig()
    p = argparse.ArgumentParser(
        prog="gram-plugin meta-train --dassl-config",
        description="Meta-train a prompt init (and GRAM's regulator) through your own Dassl trainer and config; "
                    "writes the .safetensors that wrap(trainer, init=..., regulator=True) loads.",
    )
    p.add_argument("--dassl-config", required=True, help="the trainer's yaml (as train.py --config-file)")
    p.add_argument("--dataset-config", required=True, help="the dataset's yaml (as train.py --dataset-config-file)")
    p.add_argument("--trainer", required=True, help="the trainer's registered name (TRAINER.NAME), e.g. CoOp")
    p.add_argument("--root", default=None, help="DATASET.ROOT (as train.py --root)")
    p.add_argument("--fork", default=".", help="the fork's root: its train.py (extend_cfg, dataset and trainer imports)")
    p.add_argument("--out", required=True, help="PromptInit .safetensors to write (not overwritten unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--run-dir", default=None, help="checkpoints and log.csv (default: OUT without suffix + '.run')")
    p.add_argument("--resume", action="store_true", help="continue from --run-dir's checkpoint")
    p.add_argument("--regulator", action=argparse.BooleanOptionalAction, default=True,
                   help="learn GRAM's gradient regulator with the init (default; --no-regulator: MAML + clipping only)")
    p.add_argument("--tasks", choices=["n-way", "per-dataset"], default="n-way",
                   help="n-way: tasks of --n-way base classes; per-dataset: all base classes (MAML + clipping)")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-support", type=int, default=5, help="support images per class")
    p.add_argument("--k-query", type=int, default=11, help="query images per class (n-way tasks)")
    p.add_argument("--shots", type=int, default=16, help="DATASET.NUM_SHOTS: base-class images per class to draw tasks from")
    p.add_argument("--steps", type=int, default=d.steps, help="outer steps")
    p.add_argument("--meta-batch", type=int, default=d.meta_batch_size, help="tasks per outer step")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps)
    p.add_argument("--inner-lr", type=float, default=d.inner_lr)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr)
    p.add_argument("--regulator-lr", type=float, default=d.regulator_lr)
    p.add_argument("--clip-gamma", type=float, default=5.0, help="meta-gradient clipping threshold (0 = off)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (the regulator still learns)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="outer steps between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-image-cache", action="store_true",
                   help="decode every task image from disk each time (default: decoded once and kept as uint8, "
                        "3 * INPUT.SIZE^2 bytes per base-class image)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more config options, KEY VALUE ... (as train.py)")
    return p


def _load_fork(fork: Path):
    train_py = fork / "train.py"
    if not train_py.is_file():
        raise MetaTrainCommandError(f"--fork {fork}: no train.py there (run from the fork's root or pass --fork)")
    if str(fork) not in sys.path:
        sys.path.insert(0, str(fork))
    spec = importlib.util.spec_from_file_location("_gram_fork_train", train_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports the fork's datasets and trainers: registers them
    if not hasattr(module, "extend_cfg"):
        raise MetaTrainCommandError(f"{train_py} defines no extend_cfg(cfg)")
    return module


def build_cfg(args, fork_train, trainer_cls):
    from dassl.config import get_cfg_default

    from .config import add_gram_cfg

    adapter_cls = adapter_class(trainer_cls)
    cfg = get_cfg_default()
    fork_train.extend_cfg(cfg)
    if not hasattr(cfg, "GRAM"):
        add_gram_cfg(cfg)
    for f in (args.dataset_config, args.dassl_config):
        if not Path(f).is_file():
            raise MetaTrainCommandError(f"config file {f} does not exist")
    cfg.merge_from_file(args.dataset_config)
    cfg.merge_from_file(args.dassl_config)
    if args.root:
        cfg.DATASET.ROOT = args.root
    cfg.TRAINER.NAME = args.trainer
    cfg.SEED = args.seed
    if len(args.opts) % 2:
        raise MetaTrainCommandError(f"config options come in KEY VALUE pairs, got {args.opts}")
    cfg.merge_from_list(list(args.opts))
    forced = ["DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.NUM_SHOTS", args.shots, "GRAM.ENABLED", False]
    node = adapter_cls.cfg_node
    if node and hasattr(getattr(cfg.TRAINER, node, None), "PREC"):
        forced += [f"TRAINER.{node}.PREC", "fp32"]  # second-order gradients need float32
    for key, value in zip(forced[::2], forced[1::2]):
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
    the same few-shot images again and again; decoding them was ~40 % of a meta-step here."""
    T = _require("torchvision.transforms", "torchvision")
    import torch

    from gram_plugin.data import ImageDataset

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


def _task_source(args, trainer, cfg):
    from gram_plugin.data import Item, NWayKShotTasks, PerDatasetTasks

    ds = trainer.dm.dataset
    data = decoded_once_dataset([Item(x.impath, x.label) for x in ds.train_x], ds.classnames, cfg.INPUT.SIZE[0],
                                cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD, cfg.DATASET.NAME, cache=not args.no_image_cache)
    if args.tasks == "per-dataset":
        return PerDatasetTasks(data, shots=args.shots, k_support=args.k_support)
    return NWayKShotTasks(data, args.n_way, args.k_support, args.k_query)


def run(args) -> Path:
    import torch

    from gram_plugin.meta import MetaConfig

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MetaTrainCommandError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    _require("yacs", "yacs (the [dassl] extra)")
    _require("dassl", "Dassl.pytorch")
    _require("PIL", "pillow")
    run_dir = Path(args.run_dir) if args.run_dir else out.with_suffix(".run")
    if args.threads:
        torch.set_num_threads(args.threads)
    fork_train = _load_fork(Path(args.fork).resolve())
    from dassl.engine import TRAINER_REGISTRY, build_trainer

    from .compat import patch_dassl

    patch_dassl(checkpoints=False)  # Dassl's warm-up schedulers on torch >= 2.6 (this process only)

    if args.trainer not in TRAINER_REGISTRY.registered_names():
        raise MetaTrainCommandError(
            f"trainer {args.trainer!r} is not registered by {Path(args.fork) / 'train.py'}; registered: "
            f"{', '.join(sorted(TRAINER_REGISTRY.registered_names()))}"
        )
    trainer_cls = TRAINER_REGISTRY.get(args.trainer)
    cfg = build_cfg(args, fork_train, trainer_cls)
    trainer = build_trainer(cfg)
    adapter = adapter_class(trainer_cls)(trainer)
    clip_model, tokenize = adapter.frozen_clip(), adapter.tokenizer()
    tasks = _task_source(args, trainer, cfg)
    config = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                        regulator_lr=args.regulator_lr, meta_batch_size=args.meta_batch, steps=args.steps,
                        first_order=args.first_order, clip_gamma=args.clip_gamma or None, seed=args.seed,
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    from .meta import meta_train

    init = meta_train(trainer, tasks, config, clip_model=clip_model, tokenize=tokenize, regulator=args.regulator or None,
                      run_dir=run_dir, resume=args.resume, adapter=adapter,
                      metadata={"backbone": cfg.MODEL.BACKBONE.NAME, "dataset": cfg.DATASET.NAME,
                                "dassl_config": str(args.dassl_config), "base_classes": len(trainer.dm.dataset.classnames)})
    out.parent.mkdir(parents=True, exist_ok=True)
    init.save(out, overwrite=args.overwrite)
    print(f"{init.metadata['method_name']}: wrote {out} ({', '.join(init.tensors)}; "
          f"{'with' if args.regulator else 'no'} regulator; {init.metadata.get('meta_steps')} steps; run folder {run_dir})")
    print(f'load it in train.py with  wrap(trainer, init="{out}"{", regulator=True" if args.regulator else ""})  '
          f"or the options  GRAM.ENABLED True GRAM.INIT {out}")
    return out


def cli_main(argv) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        run(args)
    except (MetaTrainCommandError, AdapterError) as e:
        print(f"gram-plugin meta-train: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["cli_main", "build_parser", "run", "MetaTrainCommandError"]
