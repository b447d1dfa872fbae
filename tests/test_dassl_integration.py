"""The three-line wrap on the real upstream code: Dassl.pytorch + KaiyangZhou/CoOp trainers.

Runs only when ``dassl`` is importable and ``GRAM_COOP_ROOT`` points at a CoOp checkout (its
``train.py``, ``trainers/``, ``datasets/``, ``clip/``); skipped otherwise. Nothing upstream is
vendored here. No pretrained CLIP exists offline, so ``load_clip_to_cpu`` is replaced by a tiny
random CLIP built with CoOp's own ``clip.model.CLIP`` class (fp16 weights, as the real loader
returns); everything else -- config (CoOp's ``extend_cfg`` + yaml files), Caltech101 data loading
from ../shared/data, ``build_trainer``, ``forward_backward``, ``train()``, ``save_model`` /
``load_model`` -- is the upstream code, run on CPU (``USE_CUDA False``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.integration

dassl = pytest.importorskip("dassl", reason="Dassl.pytorch is not installed")
COOP_ROOT = os.environ.get("GRAM_COOP_ROOT")
if not COOP_ROOT or not (Path(COOP_ROOT) / "trainers" / "coop.py").exists():
    pytest.skip("set GRAM_COOP_ROOT to a KaiyangZhou/CoOp checkout to run the integration tests", allow_module_level=True)

from gram_plugin import GradientRegulator, PromptInit  # noqa: E402
from gram_plugin.adapters import wrap  # noqa: E402
from gram_plugin.adapters.compat import patch_dassl  # noqa: E402
from gram_plugin.adapters.config import add_gram_cfg  # noqa: E402
from fixtures.hand import regulate_by_hand  # noqa: E402


@pytest.fixture(scope="module")
def coop():
    if COOP_ROOT not in sys.path:
        sys.path.insert(0, COOP_ROOT)
    spec = importlib.util.spec_from_file_location("coop_train", Path(COOP_ROOT) / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # imports CoOp's datasets and trainers (registers them)
    import trainers.cocoop
    import trainers.coop

    patch_dassl()

    def tiny_clip(cfg=None):
        from clip.model import CLIP, convert_weights

        torch.manual_seed(0)
        model = CLIP(32, 32, 2, 64, 8, 77, 49408, 32, 2, 2)
        convert_weights(model)
        return model.eval()

    saved = trainers.coop.load_clip_to_cpu, trainers.cocoop.load_clip_to_cpu
    trainers.coop.load_clip_to_cpu = trainers.cocoop.load_clip_to_cpu = tiny_clip
    yield train, tiny_clip
    trainers.coop.load_clip_to_cpu, trainers.cocoop.load_clip_to_cpu = saved


@pytest.fixture(scope="module")
def data_root(caltech_root, tmp_path_factory):
    # CoOp writes its split files next to the images: give it a private folder linking to the cache
    root = tmp_path_factory.mktemp("coop_data")
    (root / "caltech-101").mkdir()
    (root / "caltech-101" / "101_ObjectCategories").symlink_to(caltech_root / "caltech-101" / "101_ObjectCategories")
    return root


def make_cfg(train, trainer, config_file, root, out, opts=()):
    from dassl.config import get_cfg_default

    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    add_gram_cfg(cfg)  # the one line a fork adds to extend_cfg
    cfg.merge_from_file(str(Path(COOP_ROOT) / "configs/datasets/caltech101.yaml"))
    cfg.merge_from_file(str(Path(COOP_ROOT) / "configs/trainers" / trainer / config_file))
    prec = "TRAINER.COOP.PREC" if trainer == "CoOp" else "TRAINER.COCOOP.PREC"
    cfg.merge_from_list([
        "TRAINER.NAME", trainer, "DATASET.ROOT", str(root), "OUTPUT_DIR", str(out), "SEED", "1",
        "DATASET.NUM_SHOTS", "1", "DATASET.SUBSAMPLE_CLASSES", "base", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.MAX_EPOCH", "1",
        "USE_CUDA", "False", "TEST.NO_TEST", "True", prec, "fp32",
        # the configs warm up at a constant 1e-5; a larger warm-up lr keeps the checked step well above float rounding
        "OPTIM.WARMUP_CONS_LR", "0.002", *opts,
    ])
    cfg.freeze()
    return cfg


def save_init(path, ctx, seed=0):
    reg = GradientRegulator({"prompt_learner.ctx": tuple(ctx.shape)})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    init = PromptInit({"prompt_learner.ctx": ctx}, {"method": "test"}, {k: v.clone() for k, v in reg.state_dict().items()})
    init.metadata["regulator_config"] = reg.to_config()
    init.save(path)
    return reg


def zero_shot_logits(tiny_clip, classnames, images):
    from clip import clip

    model = tiny_clip().float()
    with torch.no_grad():
        t = model.encode_text(torch.cat([clip.tokenize(f"a photo of a {c.replace('_', ' ')}.") for c in classnames]))
        f = model.encode_image(images)
    t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * f @ t.t()


def test_coop_gram_prograd_on_real_trainer(coop, data_root, tmp_path):
    from dassl.engine import build_trainer

    train, tiny_clip = coop
    init_ctx = 0.3 * torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    reg = save_init(tmp_path / "init.safetensors", init_ctx)
    cfg = make_cfg(train, "CoOp", "vit_b16_ctxv1.yaml", data_root, tmp_path / "out", [
        "GRAM.ENABLED", "True", "GRAM.INIT", str(tmp_path / "init.safetensors"), "GRAM.PROGRAD", "True",
    ])
    trainer = build_trainer(cfg)
    handle = wrap(trainer)  # settings from cfg.GRAM
    ctx = trainer.model.prompt_learner.ctx
    assert torch.equal(ctx.detach(), init_ctx)
    assert trainer.optim.param_groups[0]["params"][0] is ctx

    # one real step equals the hand-computed projected + regulated SGD step
    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, len(trainer.train_loader_x)
    images, labels = trainer.parse_batch_train(batch)
    classnames = trainer.dm.dataset.classnames
    logits = trainer.model(images)
    gd = torch.autograd.grad(F.cross_entropy(logits, labels), [ctx], retain_graph=True)[0]
    teacher = zero_shot_logits(tiny_clip, classnames, images)
    assert torch.allclose(handle.adapter.zero_shot_logits(images), teacher, atol=1e-4)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="batchmean")
    gg = torch.autograd.grad(kl, [ctx])[0]
    dot = torch.sum(gd * gg)
    g = gd - dot / torch.sum(gg * gg) * gg if dot < 0 else gd
    lr, wd = trainer.optim.param_groups[0]["lr"], cfg.OPTIM.WEIGHT_DECAY
    expected = init_ctx - lr * (regulate_by_hand(reg, "prompt_learner.ctx", g) + wd * init_ctx)
    plain = init_ctx - lr * (gd + wd * init_ctx)
    trainer.forward_backward(batch)
    assert torch.allclose(ctx.detach(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ctx.detach(), plain, rtol=1e-5, atol=1e-7)

    # the whole upstream epoch loop, checkpoint, and the trainer's own load_model
    steps_before = handle.hooks[0].steps
    trainer.train()
    assert handle.hooks[0].steps == steps_before + len(trainer.train_loader_x)
    trained = ctx.detach().clone()
    fresh = build_trainer(make_cfg(train, "CoOp", "vit_b16_ctxv1.yaml", data_root, tmp_path / "fresh"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)
    assert torch.equal(fresh.model.prompt_learner.ctx.detach(), trained)
    # resume (optimiser + warm-up scheduler state) works from the same files
    assert fresh.resume_model_if_exist(str(tmp_path / "out")) == 1


def test_cocoop_regulated_step_on_real_trainer(coop, data_root, tmp_path):
    from dassl.engine import build_trainer

    train, _ = coop
    init_ctx = 0.1 * torch.randn(4, 32, generator=torch.Generator().manual_seed(8))
    reg = save_init(tmp_path / "init.safetensors", init_ctx, seed=1)
    cfg = make_cfg(train, "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml", data_root, tmp_path / "out",
                   ["DATALOADER.TRAIN_X.BATCH_SIZE", "2"])
    trainer = build_trainer(cfg)
    wrap(trainer, init=tmp_path / "init.safetensors")
    pl = trainer.model.prompt_learner
    names = ["ctx", "meta_net.linear1.weight", "meta_net.linear2.bias"]
    params = [pl.get_parameter(n) for n in names]
    before = [p.detach().clone() for p in params]
    batch = next(iter(trainer.train_loader_x))
    trainer.batch_idx, trainer.num_batches = 0, len(trainer.train_loader_x)
    images, labels = trainer.parse_batch_train(batch)
    grads = torch.autograd.grad(trainer.model(images, labels), params)
    lr, wd = trainer.optim.param_groups[0]["lr"], cfg.OPTIM.WEIGHT_DECAY
    trainer.forward_backward(batch)
    assert torch.allclose(params[0].detach(), before[0] - lr * (regulate_by_hand(reg, "prompt_learner.ctx", grads[0]) + wd * before[0]), rtol=1e-5, atol=1e-7)
    for p, b, g in zip(params[1:], before[1:], grads[1:]):  # Meta-Net: plain SGD (no regulator head)
        assert torch.allclose(p.detach(), b - lr * (g + wd * b), rtol=1e-5, atol=1e-7)
