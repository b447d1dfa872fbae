"""The wrap on the real upstream CoOp and CoCoOp trainers (Dassl.pytorch + KaiyangZhou/CoOp), on CPU.

Every precision path (fp16, fp32, amp) takes the regulated step, ProGrad projects against the
zero-shot teacher, and the trainer's own ``save_model`` / ``load_model`` / ``resume_model_if_exist``
read the trained prompt back. What the tests replace in the upstream code path (the CLIP weights, CUDA,
Dassl's torch >= 2.6 breakages) is listed in tests/fixtures/upstream.py; skipped unless
``GRAM_COOP_ROOT`` is set, an error when it is set and the code does not import.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.hand import random_regulator, regulate_by_hand
from fixtures.upstream import caltech_folder, coop, first_batch, import_dassl, init_file, make_cfg, upstream, weights_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

dassl = import_dassl()

from gram_plugin.adapters import wrap  # noqa: E402

COOP_CONFIG = "vit_b16_ctxv1.yaml"  # CTX_INIT "a photo of a": ctx (4, 64)
COCOOP_CONFIG = "vit_b16_c4_ep10_batch1_ctxv1.yaml"
# the configs warm up at a constant 1e-5; a larger warm-up lr keeps the checked step well above float rounding
WARMUP = ["OPTIM.WARMUP_CONS_LR", "0.002"]


@pytest.fixture(scope="module")
def data_root(caltech_root, tmp_path_factory):
    return caltech_folder(caltech_root, tmp_path_factory.mktemp("coop_data"))


def coop_cfg(up, data_root, out, prec="fp32", opts=()):
    config = COOP_CONFIG if up.name == "CoOp" else COCOOP_CONFIG
    batch = "8" if up.name == "CoOp" else "2"
    return make_cfg(up, data_root, out, config, [f"TRAINER.{up.node}.PREC", prec, "DATALOADER.TRAIN_X.BATCH_SIZE", batch, *WARMUP, *opts])


def save_init(path, tensors, seed=0):
    """Save an init of ``tensors`` with a random regulator over them; return the regulator."""
    reg = random_regulator({n: tuple(t.shape) for n, t in tensors.items()}, seed)
    init_file(tensors, reg).save(path)
    return reg


def zero_shot_logits(up, cfg, classnames, images):
    """CLIP on "a photo of a {class}." with the same weights, computed by hand with the repo's clip."""
    from clip import clip

    model = up.module.load_clip_to_cpu(cfg).float()
    with torch.no_grad():
        t = model.encode_text(torch.cat([clip.tokenize(f"a photo of a {c.replace('_', ' ')}.") for c in classnames]))
        f = model.encode_image(images)
    t, f = t / t.norm(dim=-1, keepdim=True), f / f.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * f @ t.t()


def test_coop_gram_prograd_on_real_trainer(coop, data_root, tmp_path):
    from dassl.engine import build_trainer

    init_ctx = 0.3 * torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    reg = save_init(tmp_path / "init.safetensors", {"prompt_learner.ctx": init_ctx})
    cfg = coop_cfg(coop, data_root, tmp_path / "out", opts=[
        "GRAM.ENABLED", "True", "GRAM.INIT", str(tmp_path / "init.safetensors"), "GRAM.PROGRAD", "True",
    ])
    trainer = build_trainer(cfg)
    handle = wrap(trainer)  # settings from cfg.GRAM
    ctx = trainer.model.prompt_learner.ctx
    assert torch.equal(ctx.detach(), init_ctx)
    assert trainer.optim.param_groups[0]["params"][0] is ctx

    # one real step equals the hand-computed projected + regulated SGD step
    batch = first_batch(trainer)
    images, labels = trainer.parse_batch_train(batch)
    logits = trainer.model(images)
    gd = torch.autograd.grad(F.cross_entropy(logits, labels), [ctx], retain_graph=True)[0]
    teacher = zero_shot_logits(coop, cfg, trainer.dm.dataset.classnames, images)
    assert torch.allclose(handle.teacher.logits(images), teacher, atol=1e-4)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="batchmean")
    gg = torch.autograd.grad(kl, [ctx])[0]
    dot = torch.sum(gd * gg)
    assert dot < 0 and gg.norm() > 1e-3 * gd.norm()  # the projection really fires here
    g = gd - dot / torch.sum(gg * gg) * gg
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
    fresh = build_trainer(coop_cfg(coop, data_root, tmp_path / "fresh"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)
    assert torch.equal(fresh.model.prompt_learner.ctx.detach(), trained)
    # resume (optimiser + warm-up scheduler state) works from the same files
    assert fresh.resume_model_if_exist(str(tmp_path / "out")) == 1


def _cpu_amp(module, monkeypatch, init_scale):
    """Upstream amp uses torch.cuda.amp, which disables itself on CPU (a plain fp32 step). Give the
    trainer's own amp branch a working CPU GradScaler and float16 autocast instead."""
    monkeypatch.setattr(module, "GradScaler", lambda *a, **k: torch.amp.GradScaler("cpu", init_scale=init_scale))
    monkeypatch.setattr(module, "autocast", lambda *a, **k: torch.autocast("cpu", dtype=torch.float16))


@pytest.mark.parametrize("prec", ["fp32", "fp16", "amp"])
@pytest.mark.parametrize("name", ["CoOp", "CoCoOp"])
def test_each_precision_path_takes_the_regulated_step(name, prec, data_root, tmp_path, monkeypatch, weights_dir):
    """fp32: model_backward_and_update (CoOp) / bare optim.step (CoCoOp); fp16: the same on half
    prompts; amp: scaler.step, regulated after unscaling; an overflowing step stays skipped."""
    from dassl.engine import build_trainer

    with upstream(name, monkeypatch, weights_dir) as up:
        if prec == "amp":
            _cpu_amp(up.module, monkeypatch, init_scale=2.0**10)
        trainer = build_trainer(coop_cfg(up, data_root, tmp_path / "out", prec=prec))
        pl = trainer.model.prompt_learner
        names = ["ctx"] if name == "CoOp" else ["ctx", "meta_net.linear1.weight", "meta_net.linear2.bias"]
        params = [pl.get_parameter(n) for n in names]
        dtype = torch.float16 if prec == "fp16" else torch.float32
        assert all(p.dtype == dtype for p in params)
        init_ctx = (0.3 * torch.randn(params[0].shape, generator=torch.Generator().manual_seed(5))).to(dtype)
        reg = save_init(tmp_path / "init.safetensors", {"prompt_learner.ctx": init_ctx})
        handle = wrap(trainer, init=tmp_path / "init.safetensors")
        assert torch.equal(params[0].detach(), init_ctx)
        before = [p.detach().clone() for p in params]

        batch = first_batch(trainer)
        images, labels = trainer.parse_batch_train(batch)

        def loss():
            if name == "CoOp":
                return F.cross_entropy(trainer.model(images), labels)
            return trainer.model(images, labels)

        if prec == "amp":  # the scaler's arithmetic: fp16 gradients of the scaled loss, unscaled in float32
            with up.module.autocast():
                grads = [g / 2.0**10 for g in torch.autograd.grad(loss() * 2.0**10, params)]
        else:
            grads = torch.autograd.grad(loss(), params)
        lr, wd = trainer.optim.param_groups[0]["lr"], trainer.cfg.OPTIM.WEIGHT_DECAY
        trainer.forward_backward(batch)
        assert handle.hooks[0].steps == 1
        # ctx: regulated; CoCoOp's Meta-Net has no regulator head here, so it takes a plain SGD step
        steps = [regulate_by_hand(reg, "prompt_learner.ctx", grads[0]).to(grads[0].dtype).float()] + [g.float() for g in grads[1:]]
        for n, p, b, g in zip(names, params, before, steps):
            expected = b.float() - lr * (g + wd * b.float())
            if prec == "fp16":  # SGD runs in half: one rounding of each term
                assert torch.allclose(p.detach().float(), expected, rtol=1e-3, atol=2e-4), n
            else:
                assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-7), n
        if prec != "fp16":  # the regulated step is not the plain one
            assert not torch.allclose(params[0].detach(), before[0] - lr * (grads[0] + wd * before[0]), rtol=1e-5, atol=1e-7)

        if prec == "amp":  # a scale that overflows: the scaler skips the step, and so does the regulator
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
            now = [p.detach().clone() for p in params]
            trainer.forward_backward(batch)
            assert trainer.scaler.get_scale() < 2.0**127
            assert handle.hooks[0].steps == 1
            assert all(torch.equal(p.detach(), q) for p, q in zip(params, now))
