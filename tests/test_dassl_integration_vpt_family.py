"""The wrap on the real upstream VPT / IVLP / MaPLe (muzairkhattak/multimodal-prompt-learning) and
PromptSRC (muzairkhattak/PromptSRC) trainers, run by Dassl.pytorch on CPU.

Runs only when ``dassl`` is importable and ``GRAM_MPL_ROOT`` / ``GRAM_PROMPTSRC_ROOT`` point at
checkouts of those repositories; skipped otherwise. Nothing upstream is vendored here. What the test
changes, and why:

* ``load_clip_to_cpu`` builds a tiny random CLIP with the repository's own ``clip.model.CLIP`` and
  ``convert_weights`` (fp16, as the real loader returns) and the trainer's own ``design_details``
  (no pretrained weights exist offline). Every call gets the same random "pretrained" weights
  (loaded like ``clip.build_model`` does, prompt tokens keep their own init), as the real loader
  reads one checkpoint: PromptSRC's prompted and zero-shot CLIPs must share their weights. MaPLe
  hard-codes widths 512 (text) and 768 (vision), so its tiny CLIP has those widths; because fp16
  matmuls are ~100x slower than fp32 on CPU, MaPLe reads an 8-class Caltech101 (4 base classes).
* ``Tensor.cuda`` / ``Module.cuda`` are no-ops while the fixtures are active: VPT and PromptSRC call
  ``.cuda()`` unconditionally in their forward / prompt learner.
* ``PREC fp16`` (all upstream configs use it; MaPLe and PromptSRC do not run under fp32 as written:
  MaPLe's ``proj.half()`` and PromptSRC's fp16 zero-shot encoder meet fp32 inputs).
* Both repositories define top-level ``trainers``, ``clip`` and ``datasets`` packages and register the
  same Dassl names, so each fixture imports its repository into a clean ``sys.modules`` / registry
  and restores the previous state afterwards.

Everything else -- config (the repo's ``extend_cfg`` + yaml files), Caltech101 data loading from
../shared/data, ``build_trainer``, ``forward_backward``, ``train()``, ``save_model`` / ``load_model``
-- is the upstream code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.hand import regulate_by_hand

pytestmark = pytest.mark.integration

dassl = pytest.importorskip("dassl", reason="Dassl.pytorch is not installed")

import gram_plugin.adapters.maple  # noqa: E402,F401  (registers the adapters)
import gram_plugin.adapters.promptsrc  # noqa: E402,F401
import gram_plugin.adapters.vpt  # noqa: E402,F401
from gram_plugin import GradientRegulator, PromptInit  # noqa: E402
from gram_plugin.adapters import adapter_for, wrap  # noqa: E402
from gram_plugin.adapters.compat import patch_dassl  # noqa: E402
from gram_plugin.adapters.config import add_gram_cfg  # noqa: E402

MPL_ROOT = os.environ.get("GRAM_MPL_ROOT")
SRC_ROOT = os.environ.get("GRAM_PROMPTSRC_ROOT")

# method -> (root env, trainer module, config file, cfg node, extra opts)
METHODS = {
    "VPT": ("GRAM_MPL_ROOT", "trainers.vpt", "vit_b16_c2_ep5_batch4_4.yaml", "VPT", ["TRAINER.VPT.PROMPT_DEPTH_VISION", "2"]),
    "IVLP": ("GRAM_MPL_ROOT", "trainers.independentVL", "vit_b16_c2_ep5_batch4_2+2ctx.yaml", "IVLP",
             ["TRAINER.IVLP.PROMPT_DEPTH_VISION", "2", "TRAINER.IVLP.PROMPT_DEPTH_TEXT", "2"]),
    "MaPLe": ("GRAM_MPL_ROOT", "trainers.maple", "vit_b16_c2_ep5_batch4_2ctx.yaml", "MAPLE", ["TRAINER.MAPLE.PROMPT_DEPTH", "2"]),
    "PromptSRC": ("GRAM_PROMPTSRC_ROOT", "trainers.promptsrc", "vit_b16_c2_ep20_batch4_4+4ctx.yaml", "PROMPTSRC",
                  ["TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2"]),
}
_SHADOWED = ("trainers", "clip", "datasets", "up_train")


def _design(method, cfg, zero_shot):
    """The repo's design_details for the prompted CLIP (or, ``zero_shot``, the prompt-free one)."""
    t = cfg.TRAINER
    if zero_shot and method != "MaPLe":
        return {"trainer": "IVLP", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    if method == "VPT":
        return {"trainer": "VPT", "vision_depth": t.VPT.PROMPT_DEPTH_VISION, "vision_ctx": t.VPT.N_CTX_VISION,
                "language_depth": 0, "language_ctx": 0}
    if method == "MaPLe":
        return {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
                "maple_length": t.MAPLE.N_CTX}
    node = t.IVLP if method == "IVLP" else t.PROMPTSRC
    return {"trainer": "IVLP", "vision_depth": node.PROMPT_DEPTH_VISION, "language_depth": node.PROMPT_DEPTH_TEXT,
            "vision_ctx": node.N_CTX_VISION, "language_ctx": node.N_CTX_TEXT}


@pytest.fixture
def upstream(request, monkeypatch):
    method = request.param
    env, module_name, *_ = METHODS[method]
    root = os.environ.get(env)
    if not root or not (Path(root) / module_name.replace(".", "/")).with_suffix(".py").exists():
        pytest.skip(f"set {env} to a checkout providing {module_name} to run the {method} integration test")
    from dassl.data.datasets import DATASET_REGISTRY
    from dassl.engine import TRAINER_REGISTRY

    saved_modules = {k: v for k, v in sys.modules.items() if k.split(".")[0] in _SHADOWED}
    saved_maps = {id(r): dict(r._obj_map) for r in (TRAINER_REGISTRY, DATASET_REGISTRY)}
    for k in saved_modules:
        del sys.modules[k]
    for r in (TRAINER_REGISTRY, DATASET_REGISTRY):
        r._obj_map.clear()
    monkeypatch.syspath_prepend(root)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    try:
        spec = importlib.util.spec_from_file_location("up_train", Path(root) / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)  # imports the repo's datasets and trainers (registers them)
        mod = importlib.import_module(module_name)
        import clip.model as cm

        # widths 512 (text) / 768 (vision) are hard-coded in MaPLe's prompt learner
        dims = (32, 32, 2, 768, 8, 77, 49408, 512, 8, 2) if method == "MaPLe" else (32, 32, 2, 64, 8, 77, 49408, 32, 2, 2)

        def tiny_clip(cfg, zero_shot_model=False):
            # One set of "pretrained" weights whatever the design, as the real loader reads one
            # checkpoint: PromptSRC builds its token buffers with the prompted CLIP and its fixed
            # embeddings / zero-shot encoder with a prompt-free one, and they must agree. Like
            # clip.build_model, the prompt tokens the checkpoint lacks keep their own random init.
            torch.manual_seed(0)
            weights = cm.CLIP(*dims, _design(method, cfg, True)).state_dict()
            torch.manual_seed(0)
            model = cm.CLIP(*dims, _design(method, cfg, zero_shot_model))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.rsplit(".", 1)[-1] in ("VPT", "VPT_shallow") for k in missing), (missing, unexpected)
            cm.convert_weights(model)
            return model.eval()

        monkeypatch.setattr(mod, "load_clip_to_cpu", tiny_clip)
        patch_dassl()
        yield method, Path(root), train
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in _SHADOWED]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        for r in (TRAINER_REGISTRY, DATASET_REGISTRY):
            r._obj_map.clear()
            r._obj_map.update(saved_maps[id(r)])


# MaPLe's text tower must be 512 wide (its compound prompts are hard-coded to 512) and fp16 matmuls
# run ~100x slower than fp32 on CPU, so a step over all 50 base classes' prompts takes minutes (the
# MaPLe test took ~35 min on 2 shared cores). MaPLe therefore reads an 8-class Caltech101 (4 base
# classes): the same upstream dataset code, on a folder linking only 8 class folders.
SMALL_DATA_METHODS = {"MaPLe": 8}
_CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")  # CoOp's Caltech101 drops these


def _caltech_copy(caltech_root, tmp_path_factory, n_classes=None):
    # CoOp writes its split files next to the images: give it a private folder linking to the cache
    root = tmp_path_factory.mktemp("mpl_data" if n_classes is None else f"mpl_data_{n_classes}cls")
    (root / "caltech-101").mkdir()
    images = caltech_root / "caltech-101" / "101_ObjectCategories"
    if n_classes is None:
        (root / "caltech-101" / "101_ObjectCategories").symlink_to(images)
        return root
    folder = root / "caltech-101" / "101_ObjectCategories"
    folder.mkdir()
    for c in sorted(c.name for c in images.iterdir() if c.is_dir() and c.name not in _CALTECH_IGNORED)[:n_classes]:
        (folder / c).symlink_to(images / c)
    return root


@pytest.fixture(scope="module")
def caltech_all(caltech_root, tmp_path_factory):
    return _caltech_copy(caltech_root, tmp_path_factory)


@pytest.fixture(scope="module")
def caltech_few(caltech_root, tmp_path_factory):
    return {n: _caltech_copy(caltech_root, tmp_path_factory, n) for n in set(SMALL_DATA_METHODS.values())}


@pytest.fixture
def data_root(upstream, request):
    n = SMALL_DATA_METHODS.get(upstream[0])
    return request.getfixturevalue("caltech_all") if n is None else request.getfixturevalue("caltech_few")[n]


def make_cfg(upstream, root, out, opts=()):
    from dassl.config import get_cfg_default

    method, repo, train = upstream
    _, _, config_file, node, extra = METHODS[method]
    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    add_gram_cfg(cfg)
    cfg.merge_from_file(str(repo / "configs/datasets/caltech101.yaml"))
    cfg.merge_from_file(str(repo / "configs/trainers" / method / config_file))
    cfg.merge_from_list([
        "TRAINER.NAME", method, "DATASET.ROOT", str(root), "OUTPUT_DIR", str(out), "SEED", "1",
        "DATASET.NUM_SHOTS", "1", "DATASET.SUBSAMPLE_CLASSES", "base", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1",
        "USE_CUDA", "False", "TEST.NO_TEST", "True", f"TRAINER.{node}.PREC", "fp16",
        "OPTIM.WARMUP_CONS_LR", "0.002", *extra, *opts,
    ])
    cfg.freeze()
    return cfg


def loss_of(method, trainer, images, labels):
    """The loss each upstream forward_backward differentiates (fp16 branch), recomputed here."""
    model = trainer.model
    if method == "VPT":
        return model(images, labels, training=True)
    if method != "PromptSRC":
        return model(images, labels)
    node = trainer.cfg.TRAINER.PROMPTSRC
    ce, text_f, fixed, zs_image, image_f, zs_logits, logits = model(images, labels)
    return ce + (
        F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits, 1), reduction="sum", log_target=True) / logits.numel()
        + F.l1_loss(text_f, fixed) * node.TEXT_LOSS_WEIGHT
        + F.l1_loss(image_f, zs_image) * node.IMAGE_LOSS_WEIGHT
    )


@pytest.mark.parametrize("upstream", list(METHODS), indirect=True)
def test_regulated_step_train_loop_and_checkpoint_on_real_trainer(upstream, data_root, tmp_path):
    from dassl.engine import build_trainer

    method = upstream[0]
    trainer = build_trainer(make_cfg(upstream, data_root, tmp_path / "out"))
    adapter = adapter_for(trainer)
    params = adapter.prompt_parameters()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(params) == trainable  # every learnable tensor of the method, nothing frozen
    if method == "PromptSRC":
        assert not any("ZS_image_encoder" in n for n in params)

    g = torch.Generator().manual_seed(7)
    init = {n: (0.05 * torch.randn(p.shape, generator=g)).to(p.dtype) for n, p in params.items()}
    reg = GradientRegulator({n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for q in reg.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g))
    path = PromptInit(init, {"method": method}).save(tmp_path / "init.safetensors")
    handle = wrap(trainer, init=path, regulator=reg)
    assert sorted(handle.init_names) == sorted(params)
    for n, p in params.items():
        assert torch.equal(p.detach(), init[n])

    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, len(trainer.train_loader_x) + 1  # no epoch end (GPA) in this step
    images, labels = trainer.parse_batch_train(batch)
    names = list(params)
    grads = torch.autograd.grad(loss_of(method, trainer, images, labels), [params[n] for n in names])
    lr, wd = trainer.optim.param_groups[0]["lr"], trainer.cfg.OPTIM.WEIGHT_DECAY
    expected = {n: init[n].float() - lr * (regulate_by_hand(reg, n, gr).to(gr.dtype).float() + wd * init[n].float()) for n, gr in zip(names, grads)}
    plain = {n: init[n].float() - lr * (gr.float() + wd * init[n].float()) for n, gr in zip(names, grads)}
    trainer.forward_backward(batch)
    for n in names:
        atol = 2e-3 if params[n].dtype == torch.float16 else 1e-7
        assert torch.allclose(params[n].detach().float(), expected[n], atol=atol, rtol=1e-5), n
    assert any(not torch.allclose(params[n].detach().float(), plain[n], atol=1e-7, rtol=1e-5) for n in names if params[n].dtype == torch.float32)

    # the whole upstream epoch loop (PromptSRC: GPA at the epoch end), checkpoint, the trainer's own load_model
    steps = handle.hooks[0].steps
    trainer.train()
    assert handle.hooks[0].steps == steps + len(trainer.train_loader_x)
    trained = {n: p.detach().clone() for n, p in params.items()}
    fresh = build_trainer(make_cfg(upstream, data_root, tmp_path / "fresh"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)
    for n, p in adapter_for(fresh).prompt_parameters().items():
        assert torch.equal(p.detach(), trained[n]), n


@pytest.mark.parametrize("upstream", ["VPT", "IVLP", "PromptSRC"], indirect=True)
def test_meta_train_through_real_trainer_then_wrap_an_fp16_trainer(upstream, data_root, tmp_path):
    """adapters.meta on the upstream trainer (fp32), its class buffers rebuilt with the repo's own
    clip.tokenize (checked against the trainer's buffers), then the init loaded by an fp16 trainer.
    MaPLe is left out: its ``proj.half()`` does not run under fp32 (see the module docstring)."""
    from clip import clip
    from dassl.engine import build_trainer
    from torchvision import transforms as T

    from gram_plugin.adapters.meta import meta_train
    from gram_plugin.data import ImageDataset, Item, NWayKShotTasks
    from gram_plugin.meta import MetaConfig

    method = upstream[0]
    node = METHODS[method][3]
    cfg = make_cfg(upstream, data_root, tmp_path / "meta", [f"TRAINER.{node}.PREC", "fp32", "DATASET.NUM_SHOTS", "2"])
    trainer = build_trainer(cfg)
    module = sys.modules[type(trainer).__module__]
    if method == "PromptSRC":
        # upstream builds the frozen zero-shot encoder in fp16 whatever PREC says (its own fp32 forward
        # fails on it); meta_train runs it in that dtype, so it is left as built
        assert trainer.model.prompt_learner.ZS_image_encoder.conv1.weight.dtype == torch.float16
        clip_model = module.load_clip_to_cpu(cfg, True).float()
    else:
        clip_model = module.load_clip_to_cpu(cfg).float()
    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)])
    ds = trainer.dm.dataset
    tasks = NWayKShotTasks(ImageDataset([Item(x.impath, x.label) for x in ds.train_x], ds.classnames, tf), 2, 1, 1)
    config = MetaConfig(steps=1, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, clip_gamma=5.0, progress=False)
    init = meta_train(trainer, tasks, config, clip_model=clip_model, tokenize=clip.tokenize, regulator=True)
    params = adapter_for(trainer).prompt_parameters()
    assert list(init.tensors) == list(params)
    assert any(not torch.equal(init.tensors[n], p.detach()) for n, p in params.items())

    fp16 = build_trainer(make_cfg(upstream, data_root, tmp_path / "tune"))
    handle = wrap(fp16, init=init)
    assert sorted(handle.init_names) == sorted(params)
    for n, p in adapter_for(fp16).prompt_parameters().items():
        assert torch.equal(p.detach(), init.tensors[n].to(p.dtype)), n
    batch = next(iter(fp16.train_loader_x))
    fp16.batch_idx, fp16.num_batches = 0, len(fp16.train_loader_x) + 1
    fp16.forward_backward(batch)
    assert handle.hooks[0].steps == 1
