"""Dassl adapters on replicas of the real CoOp / CoCoOp / ProGrad trainers (tests/fixtures/dassl_like.py).

Every step is checked against a hand computation done outside the wrapped trainer: the gradient by
``torch.autograd.grad`` on a fresh forward, the regulator by its formula (tanh(W g + b)) from its raw
weights, ProGrad by its formula with the zero-shot teacher computed by open_clip's own
``encode_text`` on "a photo of a {class}.", and SGD (momentum 0.9, weight decay 5e-4, first step)
by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.dassl_like import (CLASSNAMES, CoCoOp, CoOp, ProGrad, ZeroShotCLIP, assert_untouched, build, make_batch,
                                 make_cfg, trainer_state)
from gram_plugin import ConfigError, GradientRegulator, PromptInitError
from gram_plugin.adapters import AdapterError, GenericAdapter, adapter_for, supported_trainers, wrap
from fixtures.hand import random_regulator, regulate_by_hand, save_init

LR, WD = 0.002, 5e-4


def sgd_first_step(p, g):
    return p - LR * (g + WD * p)


def ce_grads(trainer, batch, params):
    image, label = batch["img"], batch["label"]
    out = trainer.model(image) if not isinstance(trainer, CoCoOp) else _cocoop_logits(trainer, image)
    return torch.autograd.grad(F.cross_entropy(out.float(), label), params)


def _cocoop_logits(trainer, image):
    trainer.model.prompt_learner.training = False
    try:
        return trainer.model(image)
    finally:
        trainer.model.prompt_learner.training = True


# ---------------------------------------------------------------------------------------------
def test_coop_fp32_init_swapped_and_step_equals_hand_computed_regulated_step(tmp_path):
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    ctx = trainer.model.prompt_learner.ctx
    assert tuple(ctx.shape) == (4, 32)  # CTX_INIT sets n_ctx to its word count
    g = torch.Generator().manual_seed(3)
    init_ctx = 0.05 * torch.randn(4, 32, generator=g)
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    path = save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, reg)

    handle = wrap(trainer, init=path)
    assert handle.init_names == ["prompt_learner.ctx"]
    assert torch.equal(ctx.detach(), init_ctx)
    assert trainer.optim.param_groups[0]["params"][0] is ctx  # swapped in place: optimiser still holds it
    assert trainer.model.prompt_learner.ctx is ctx

    batch = make_batch(seed=0)
    (g_ce,) = ce_grads(trainer, batch, [ctx])
    expected = sgd_first_step(init_ctx, regulate_by_hand(reg, "prompt_learner.ctx", g_ce))
    plain = sgd_first_step(init_ctx, g_ce)
    trainer.forward_backward(batch)
    assert torch.allclose(ctx.detach(), expected, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(ctx.detach(), plain, atol=1e-7, rtol=1e-5)  # the regulator did something
    assert handle.hooks[0].steps == 1


def test_coop_csc_shape_and_ctx_init_mismatch_are_reported(tmp_path):
    csc = build(CoOp, make_cfg(n_ctx=4, csc=True))
    assert tuple(csc.model.prompt_learner.ctx.shape) == (len(CLASSNAMES), 4, 32)
    fits = save_init(tmp_path, {"prompt_learner.ctx": torch.ones(len(CLASSNAMES), 4, 32)}, name="csc.safetensors")
    wrap(csc, init=fits, regulator=None)
    assert torch.equal(csc.model.prompt_learner.ctx.detach(), torch.ones(len(CLASSNAMES), 4, 32))

    generic16 = save_init(tmp_path, {"prompt_learner.ctx": torch.zeros(16, 32)}, name="n16.safetensors")
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    before = trainer.model.prompt_learner.ctx.detach().clone()
    with pytest.raises(PromptInitError, match=r"shape of prompt_learner.ctx: init \(16, 32\) vs model \(4, 32\)"):
        wrap(trainer, init=generic16)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), before)  # nothing copied


def test_init_alias_ctx_and_unknown_names(tmp_path):
    trainer = build(CoOp, make_cfg(n_ctx=4))
    path = save_init(tmp_path, {"ctx": torch.full((4, 32), 0.5)})
    wrap(trainer, init=path)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), torch.full((4, 32), 0.5))
    bad = save_init(tmp_path, {"prompt_learner.ctx": torch.zeros(4, 32), "image_encoder.VPT": torch.zeros(2, 64)}, name="bad.safetensors")
    with pytest.raises(PromptInitError, match="not a prompt parameter of the model: image_encoder.VPT"):
        wrap(build(CoOp, make_cfg(n_ctx=4)), init=bad)


def test_standalone_style_init_named_ctx_with_its_regulator(tmp_path):
    # gram_plugin.models.PromptedCLIP names its context "ctx": its init and regulator must fit CoOp
    trainer = build(CoOp, make_cfg(n_ctx=4))
    reg = random_regulator({"ctx": (4, 32)}, seed=6)
    init_ctx = 0.05 * torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    handle = wrap(trainer, init=save_init(tmp_path, {"ctx": init_ctx}, reg))
    assert handle.init_names == ["prompt_learner.ctx"] and handle.regulator.has_head("prompt_learner.ctx")
    ctx = trainer.model.prompt_learner.ctx
    batch = make_batch(seed=5)
    (g,) = ce_grads(trainer, batch, [ctx])
    trainer.forward_backward(batch)
    assert torch.allclose(ctx.detach(), sgd_first_step(init_ctx, regulate_by_hand(reg, "ctx", g)), atol=1e-7, rtol=1e-5)


def test_cocoop_regulates_ctx_and_passes_meta_net_through(tmp_path):
    trainer = build(CoCoOp, make_cfg(trainer="CoCoOp", n_ctx=4))
    adapter = adapter_for(trainer)
    names = list(adapter.prompt_parameters())
    assert names == [
        "prompt_learner.ctx",
        "prompt_learner.meta_net.linear1.weight",
        "prompt_learner.meta_net.linear1.bias",
        "prompt_learner.meta_net.linear2.weight",
        "prompt_learner.meta_net.linear2.bias",
    ]
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    init_ctx = 0.02 * torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    path = save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, reg)  # meta_net left out (strict=False)
    wrap(trainer, init=path)
    params = dict(trainer.model.named_parameters())
    tensors = [params[n] for n in names]
    before = [t.detach().clone() for t in tensors]
    batch = make_batch(seed=1)
    grads = ce_grads(trainer, batch, tensors)
    trainer.forward_backward(batch)
    expected_ctx = sgd_first_step(before[0], regulate_by_hand(reg, names[0], grads[0]))
    assert torch.allclose(tensors[0].detach(), expected_ctx, atol=1e-7, rtol=1e-5)
    for t, b, g in zip(tensors[1:], before[1:], grads[1:]):
        assert torch.allclose(t.detach(), sgd_first_step(b, g), atol=1e-7, rtol=1e-5)


def test_cocoop_strict_init_requires_meta_net(tmp_path):
    path = save_init(tmp_path, {"prompt_learner.ctx": torch.zeros(4, 32)})
    with pytest.raises(PromptInitError, match="missing in init: prompt_learner.meta_net.linear1.weight"):
        wrap(build(CoCoOp, make_cfg(trainer="CoCoOp", n_ctx=4)), init=path, strict=True)


# ---------------------------------------------------------------------------------------------
def project_by_hand(gd, gg, lam=1.0):
    dot = torch.sum(gd * gg)
    return gd - lam * dot / torch.sum(gg * gg) * gg if dot < 0 else gd


def test_coop_prograd_teacher_is_zero_shot_clip_and_step_is_projected(tmp_path):
    from conftest import make_tiny_clip

    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    init_ctx = torch.randn(4, 32, generator=torch.Generator().manual_seed(11))
    handle = wrap(trainer, init=save_init(tmp_path, {"prompt_learner.ctx": init_ctx}), prograd=1.0)

    # the teacher equals open_clip's own zero-shot CLIP on "a photo of a {class}."
    zs = ZeroShotCLIP(make_tiny_clip(0), CLASSNAMES)
    batch = make_batch(seed=0)
    teacher = zs(batch["img"]).detach()
    assert torch.allclose(handle.teacher.logits(batch["img"]), teacher, atol=1e-5)

    # both branches: steps where G_d and G_g conflict (projected) and steps where they do not
    conflicts = run_and_check_projected_steps(trainer, handle, zs, seeds=range(8))
    assert 0 < conflicts < 8


def run_and_check_projected_steps(trainer, handle, teacher, seeds, lam=1.0):
    """Step the wrapped trainer; each step must equal SGD on the hand-projected gradient."""
    ctx = trainer.model.prompt_learner.ctx
    conflicts = 0
    for seed in seeds:
        batch = make_batch(seed=seed)
        p0 = ctx.detach().clone()
        logits = trainer.model(batch["img"])
        (gd,) = torch.autograd.grad(F.cross_entropy(logits, batch["label"]), [ctx], retain_graph=True)
        kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher(batch["img"]).detach(), -1), reduction="batchmean")
        (gg,) = torch.autograd.grad(kl, [ctx])
        conflicts += bool(torch.sum(gd * gg) < 0)
        momentum = trainer.optim.state[ctx].get("momentum_buffer")
        d = project_by_hand(gd, gg, lam) + WD * p0
        buf = d if momentum is None else 0.9 * momentum + d
        trainer.forward_backward(batch)
        assert torch.allclose(ctx.detach(), p0 - LR * buf, atol=1e-7, rtol=1e-5), seed
        assert handle.hooks[0].arguments.pending == {}  # cleared after each step
    return conflicts


def test_prograd_projection_with_a_conflicting_teacher(tmp_path):
    # a teacher that is sure of a wrong class makes G_d and G_g conflict: the projection must act
    trainer = build(CoOp, make_cfg(n_ctx=4))
    labels = {seed: make_batch(seed=seed)["label"] for seed in range(3)}
    current = {}

    def wrong_teacher(images):
        return 20.0 * F.one_hot((current["labels"] + 1) % len(CLASSNAMES), len(CLASSNAMES)).float()

    original = trainer.parse_batch_train

    def parse(batch):
        current["labels"] = batch["label"]
        return original(batch)

    trainer.parse_batch_train = parse
    handle = wrap(trainer, prograd=0.7, teacher=wrong_teacher)

    conflicts = 0
    for seed in range(3):
        current["labels"] = labels[seed]
        conflicts += run_and_check_projected_steps(trainer, handle, wrong_teacher, [seed], lam=0.7)
    assert conflicts >= 1, "the conflicting teacher did not produce conflicting gradients"


def test_cocoop_prograd_projects_each_tensor_against_the_zero_shot_teacher():
    from conftest import make_tiny_clip

    trainer = build(CoCoOp, make_cfg(trainer="CoCoOp", ctx_init="a photo of a"))
    handle = wrap(trainer, prograd=1.0)
    zs = ZeroShotCLIP(make_tiny_clip(0), CLASSNAMES)
    names = list(handle.params)
    tensors = [handle.params[n] for n in names]
    with torch.no_grad():  # move ctx away from the hand-crafted prompt so G_g is not ~0
        tensors[0].add_(0.3 * torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(2)))
    batch = make_batch(seed=3)
    before = [t.detach().clone() for t in tensors]
    logits = _cocoop_logits(trainer, batch["img"])
    gds = torch.autograd.grad(F.cross_entropy(logits, batch["label"]), tensors, retain_graph=True)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(zs(batch["img"]).detach(), -1), reduction="batchmean")
    ggs = torch.autograd.grad(kl, tensors)
    assert trainer.model.prompt_learner.training  # the logits were taken without leaving train mode
    trainer.forward_backward(batch)
    for n, t, b, gd, gg in zip(names, tensors, before, gds, ggs):
        assert torch.allclose(t.detach(), sgd_first_step(b, project_by_hand(gd, gg)), atol=1e-7, rtol=1e-5), n


def test_prograd_needs_a_teacher():
    with pytest.raises(AdapterError, match="CTX_INIT is empty"):
        wrap(build(CoOp, make_cfg(n_ctx=4)), prograd=1.0)
    trainer = build(CoOp, make_cfg(n_ctx=4))
    handle = wrap(trainer, prograd=0.5, teacher=lambda images: torch.zeros(images.shape[0], len(CLASSNAMES)))
    trainer.forward_backward(make_batch())
    assert handle.hooks[0].steps == 1


def test_prograd_own_trainer_projects_then_regulates_and_refuses_double_projection(tmp_path):
    trainer = build(ProGrad, make_cfg(trainer="ProGrad", ctx_init="a photo of a"))
    with pytest.raises(AdapterError, match="already projects"):
        wrap(trainer, prograd=1.0)
    reg = random_regulator({"prompt_learner.ctx": (4, 32)}, seed=4)
    init_ctx = torch.randn(4, 32, generator=torch.Generator().manual_seed(11))
    wrap(trainer, init=save_init(tmp_path, {"prompt_learner.ctx": init_ctx}), regulator=reg)
    ctx = trainer.model.prompt_learner.ctx
    batch = make_batch(seed=2)
    logits = trainer.model(batch["img"])
    xe, kl = trainer.criterion(logits, trainer.zs_clip(batch["img"]).detach(), batch["label"])
    gd, gg = (torch.autograd.grad(loss, [ctx], retain_graph=True)[0] for loss in (xe, kl))
    expected = sgd_first_step(init_ctx, regulate_by_hand(reg, "prompt_learner.ctx", project_by_hand(gd, gg)))
    trainer.forward_backward(batch)
    assert torch.allclose(ctx.detach(), expected, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
def test_amp_regulates_unscaled_gradients_and_inf_steps_stay_skipped(tmp_path):
    trainer = build(CoOp, make_cfg(n_ctx=4, prec="amp"))
    ctx = trainer.model.prompt_learner.ctx
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    handle = wrap(trainer, regulator=reg)
    batch = make_batch(seed=0)
    p0 = ctx.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(trainer.model(batch["img"]), batch["label"])
    (g,) = torch.autograd.grad(loss, [ctx])  # no scaler: the unscaled gradient
    trainer.forward_backward(batch)
    assert trainer.scaler.get_scale() > 1  # the loss really was scaled
    assert torch.allclose(ctx.detach(), sgd_first_step(p0, regulate_by_hand(reg, "prompt_learner.ctx", g)), atol=1e-7, rtol=1e-5)
    assert handle.hooks[0].steps == 1

    # an inf gradient: GradScaler skips optimizer.step, so the hook never runs and nothing moves
    p1 = ctx.detach().clone()
    scale = trainer.scaler.get_scale()
    h = ctx.register_hook(lambda grad: grad * float("inf"))
    trainer.forward_backward(make_batch(seed=1))
    h.remove()
    assert torch.equal(ctx.detach(), p1)
    assert handle.hooks[0].steps == 1
    assert trainer.scaler.get_scale() == scale / 2


def test_fp16_prompts_stay_half_and_step_matches(tmp_path):
    trainer = build(CoOp, make_cfg(n_ctx=4, prec="fp16"))
    ctx = trainer.model.prompt_learner.ctx
    assert ctx.dtype == torch.float16
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    wrap(trainer, regulator=reg)
    batch = make_batch(seed=0)
    p0 = ctx.detach().float().clone()
    (g,) = torch.autograd.grad(F.cross_entropy(trainer.model(batch["img"]), batch["label"]), [ctx])
    r = regulate_by_hand(reg, "prompt_learner.ctx", g.float()).half().float()
    trainer.forward_backward(batch)
    assert ctx.dtype == torch.float16 and torch.isfinite(ctx).all()
    assert torch.allclose(ctx.detach().float(), sgd_first_step(p0, r), atol=2e-3)


# ---------------------------------------------------------------------------------------------
def test_optimizer_state_and_checkpoint_roundtrip_through_trainers_load_model(tmp_path):
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    wrap(trainer, init=save_init(tmp_path, {"prompt_learner.ctx": 0.1 * torch.ones(4, 32)}), regulator=reg, clip=1.0)
    for seed in range(3):
        trainer.batch_idx = seed
        trainer.forward_backward(make_batch(seed=seed))
    ctx = trainer.model.prompt_learner.ctx
    state = trainer.optim.state[ctx]
    assert state["momentum_buffer"].shape == ctx.shape and torch.isfinite(state["momentum_buffer"]).all()
    trainer.save_model(0, str(tmp_path / "out"))

    fresh = build(CoOp, make_cfg(ctx_init="a photo of a"))
    fresh.load_model(str(tmp_path / "out"), epoch=1)  # the trainer's own load_model (weights_only=True)
    assert torch.equal(fresh.model.prompt_learner.ctx.detach(), ctx.detach())
    sd = torch.load(tmp_path / "out" / "prompt_learner" / "model.pth.tar-1", weights_only=True)
    fresh.optim.load_state_dict(sd["optimizer"])
    assert torch.equal(fresh.optim.state[fresh.model.prompt_learner.ctx]["momentum_buffer"], state["momentum_buffer"])


def test_regulator_from_init_file_is_used_by_default(tmp_path):
    trainer = build(CoOp, make_cfg(n_ctx=4))
    reg = random_regulator({"prompt_learner.ctx": (4, 32)}, seed=9)
    handle = wrap(trainer, init=save_init(tmp_path, {"prompt_learner.ctx": torch.zeros(4, 32)}, reg))
    assert handle.regulator is not None
    for k, v in reg.state_dict().items():
        assert torch.equal(handle.regulator.state_dict()[k], v)
    with pytest.raises(AdapterError, match="already wrapped"):
        wrap(trainer, regulator=reg)
    handle.remove()
    assert handle.hooks == []
    before = trainer.model.prompt_learner.ctx.detach().clone()
    batch = make_batch(seed=4)
    (g,) = ce_grads(trainer, batch, [trainer.model.prompt_learner.ctx])
    trainer.forward_backward(batch)  # unwrapped again: a plain SGD step
    assert torch.allclose(trainer.model.prompt_learner.ctx.detach(), sgd_first_step(before, g), atol=1e-7, rtol=1e-5)
    wrap(trainer, regulator=reg)  # and it can be wrapped again


# ---------------------------------------------------------------------------------------------
def test_registry_subclass_unknown_generic_and_dataparallel():
    assert {"CoOp", "CoCoOp", "ProGrad"} <= set(supported_trainers())

    class MyForkCoOp(CoOp):
        pass

    assert type(adapter_for(build(MyForkCoOp, make_cfg()))).__name__ == "CoOpAdapter"

    trainer = build(CoOp, make_cfg(n_ctx=4))

    class Unknown:
        model = trainer.model

    with pytest.raises(AdapterError, match=r"no gram-plugin adapter for trainer 'Unknown'; supported: CoOp, .*CoCoOp"):
        wrap(Unknown(), prograd=None, regulator=None)

    # DataParallel adds "module."; names come back without it, and the generic adapter works by name
    trainer.model = torch.nn.DataParallel(trainer.model)
    adapter = GenericAdapter(trainer, names=["module.prompt_learner.ctx"])
    assert list(adapter.prompt_parameters()) == ["prompt_learner.ctx"]
    assert list(adapter_for(trainer).prompt_parameters()) == ["prompt_learner.ctx"]
    with pytest.raises(AdapterError, match="do not require gradients"):
        GenericAdapter(trainer, names=["image_encoder.conv1.weight"]).prompt_parameters()
    reg = GradientRegulator({"prompt_learner.ctx": (4, 32)})
    handle = wrap(trainer, regulator=reg, params=["prompt_learner.ctx"])
    trainer.forward_backward(make_batch())
    assert handle.hooks[0].steps == 1


def test_cfg_gram_node_drives_wrap(tmp_path):
    path = save_init(tmp_path, {"prompt_learner.ctx": torch.full((4, 32), 0.25)}, random_regulator({"prompt_learner.ctx": (4, 32)}))
    cfg = make_cfg(ctx_init="a photo of a", gram={})
    cfg.merge_from_list(["GRAM.ENABLED", "True", "GRAM.INIT", str(path), "GRAM.PROGRAD", "True", "GRAM.PROGRAD_LAMBDA", "0.5"])
    trainer = build(CoOp, cfg)
    handle = wrap(trainer)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), torch.full((4, 32), 0.25))
    assert repr(handle.transform) == "chain(prograd(lam=0.5), regulate(GradientRegulator))"
    trainer.forward_backward(make_batch())
    assert handle.hooks[0].steps == 1

    off = build(CoOp, make_cfg(gram={}))
    before = off.model.prompt_learner.ctx.detach().clone()
    assert not wrap(off).enabled
    assert torch.equal(off.model.prompt_learner.ctx.detach(), before)
    with pytest.raises(AdapterError, match="add_gram_cfg"):
        wrap(build(CoOp, make_cfg()))


# ---------------------------------------------------------------------------------------------
# compat.patch_dassl on a minimal stand-in for dassl's two affected modules (CI has no Dassl;
# tests/test_dassl_integration.py runs it on the real one)
_FAKE_LR_SCHEDULER = '''
from torch.optim.lr_scheduler import _LRScheduler

class _BaseWarmupScheduler(_LRScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1, verbose=False):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch, verbose)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

class ConstantWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1, verbose=False):
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch, verbose)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]
'''

_FAKE_TORCHTOOLS = '''
import torch

def load_checkpoint(fpath):
    return torch.load(fpath, map_location="cpu")
'''


@pytest.fixture
def fake_dassl(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "dassl"
    (pkg / "optim").mkdir(parents=True)
    (pkg / "utils").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "optim" / "__init__.py").write_text("")
    (pkg / "optim" / "lr_scheduler.py").write_text(_FAKE_LR_SCHEDULER)
    (pkg / "utils" / "__init__.py").write_text("from .torchtools import load_checkpoint\n")
    (pkg / "utils" / "torchtools.py").write_text(_FAKE_TORCHTOOLS)
    import sys

    for name in [m for m in sys.modules if m == "dassl" or m.startswith("dassl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    import dassl.optim.lr_scheduler  # noqa: F401
    import dassl.utils

    yield dassl
    for name in [m for m in sys.modules if m == "dassl" or m.startswith("dassl.")]:
        del sys.modules[name]


def test_compat_patch_fixes_warmup_and_weights_only_checkpoints(fake_dassl, tmp_path):
    from dassl.optim.lr_scheduler import ConstantWarmupScheduler

    from gram_plugin.adapters.compat import patch_dassl

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10.0)
    with pytest.raises(TypeError):  # what users hit today on torch >= 2.6
        ConstantWarmupScheduler(opt, cosine, 1, 1e-5)
    patch_dassl()
    patch_dassl()  # idempotent
    sched = ConstantWarmupScheduler(opt, cosine, 1, 1e-5)
    assert opt.param_groups[0]["lr"] == 1e-5
    opt.step()
    sched.step()
    state = sched.state_dict()
    assert isinstance(state["successor"], dict)
    path = tmp_path / "ck.pth"
    torch.save({"scheduler": state, "epoch": 1}, path)
    from dassl.utils import load_checkpoint

    loaded = load_checkpoint(str(path))  # weights_only=True
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    fresh = ConstantWarmupScheduler(fresh_opt, torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, 10.0), 1, 1e-5)
    fresh.load_state_dict(loaded["scheduler"])
    assert fresh.last_epoch == sched.last_epoch and fresh.successor.last_epoch == cosine.last_epoch
    assert fresh.get_last_lr() == sched.get_last_lr()

    old = tmp_path / "old.pth"  # a checkpoint of unpatched Dassl holds the successor object
    torch.save({"scheduler": {"successor": cosine}}, old)
    with pytest.raises(RuntimeError, match=r"weights_only=True .*patch_dassl\(allow_pickle=True\)"):
        load_checkpoint(str(old))


def test_coop_prograd_takes_g_g_from_the_trainers_own_forward():
    """One forward per step (G_g from the trainer's forward, teacher on its image features), and the
    same prompts as the two-forward wrapper every other adapter uses."""
    from gram_plugin.adapters.trainers.coop import CoOpAdapter

    def counted(trainer):
        calls = {"image": 0}
        trainer.model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
        return calls

    one = build(CoOp, make_cfg(ctx_init="a photo of a"))
    two = build(CoOp, make_cfg(ctx_init="a photo of a"))
    two_forward = CoOpAdapter(two)
    two_forward.logits_from_own_forward = False
    h_one, h_two = wrap(one, prograd=1.0), wrap(two, prograd=1.0, adapter=two_forward)
    n_one, n_two = counted(one), counted(two)
    for p in (one.model.prompt_learner.ctx, two.model.prompt_learner.ctx):
        with torch.no_grad():  # away from the hand-crafted prompt, so G_g is not ~0
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    for seed in range(3):
        one.forward_backward(make_batch(seed=seed))
        two.forward_backward(make_batch(seed=seed))
    assert n_one["image"] == 3 and n_two["image"] == 9  # own forward vs + teacher + second forward
    torch.testing.assert_close(one.model.prompt_learner.ctx, two.model.prompt_learner.ctx, atol=1e-6, rtol=1e-5)
    assert h_one.hooks[0].steps == 3
    with torch.no_grad():  # inference forwards never compute G_g
        one.model(make_batch(seed=0)["img"])
    h_one.remove()
    assert not one.model._forward_hooks and len(one.model.image_encoder._forward_hooks) == 1  # only ours left


def test_prograd_own_forward_names_a_model_that_does_not_return_logits():
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    wrap(trainer, prograd=1.0)
    model = trainer.model
    own = type(model).forward
    model.forward = lambda image: (own(model, image), "extra")  # a fork returning a tuple
    with pytest.raises(AdapterError, match=r"returned tuple, not the logits; state forward_output on CoOpAdapter"):
        trainer.forward_backward(make_batch(seed=0))


# ---------------------------------------------------------------------------------------------
# wrap(regulator=True), all-or-nothing, the ProGrad threshold
def test_regulator_true_is_the_inits_regulator_and_refused_without_one(tmp_path):
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    init_ctx = 0.05 * torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    path = save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, reg)
    handle = wrap(trainer, init=path, regulator=True)  # the README's headline call
    assert torch.equal(handle.regulator.state_dict()["heads.prompt_learner__ctx.gamma.weight"],
                       reg.state_dict()["heads.prompt_learner__ctx.gamma.weight"])
    batch = make_batch(seed=0)
    (g,) = ce_grads(trainer, batch, [trainer.model.prompt_learner.ctx])
    trainer.forward_backward(batch)
    assert torch.allclose(trainer.model.prompt_learner.ctx.detach(),
                          sgd_first_step(init_ctx, regulate_by_hand(reg, "prompt_learner.ctx", g)), atol=1e-7, rtol=1e-5)

    bare = save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, name="bare.safetensors")
    other = build(CoOp, make_cfg(ctx_init="a photo of a"))
    before = other.model.prompt_learner.ctx.detach().clone()
    with pytest.raises(PromptInitError, match="regulator=True uses the regulator saved with the init, but the init .*bare.safetensors holds none"):
        wrap(other, init=bare, regulator=True)
    with pytest.raises(PromptInitError, match="no init"):
        wrap(other, regulator=True)
    assert torch.equal(other.model.prompt_learner.ctx.detach(), before)  # nothing copied


def test_failed_wrap_changes_nothing(tmp_path):
    init_ctx = torch.ones(4, 32)
    good_reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    wrong_reg = random_regulator({"prompt_learner.other": (4, 32)})
    fits = save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, good_reg, name="fits.safetensors")
    cases = [
        # the init fits, the regulator saved with it is for another parameter name
        (dict(init=save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, wrong_reg, name="a.safetensors")),
         AdapterError, "none of which is a prompt"),
        # the init fits, regulator=True but the init holds none
        (dict(init=save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, name="b.safetensors"), regulator=True),
         PromptInitError, "holds none"),
        # the init fits, the regulator argument has the wrong type
        (dict(init=fits, regulator=3), ConfigError, "regulator must be"),
        # the init fits, ProGrad asked for without a zero-shot teacher (no CTX_INIT)
        (dict(init=fits, prograd=1.0), AdapterError, "needs a zero-shot teacher"),
        # the init fits, a negative ProGrad lambda / a bad clip value
        (dict(init=fits, prograd=-1.0, teacher=lambda x: x), ConfigError, r"prograd \(ProGrad's lambda\) must be a finite number >= 0"),
        (dict(init=fits, clip=-2.0), ConfigError, "clip must be a finite number > 0"),
        # the init does not fit
        (dict(init=save_init(tmp_path, {"prompt_learner.ctx": torch.ones(3, 32)}, name="c.safetensors")),
         PromptInitError, "shape of prompt_learner.ctx"),
        # the init fits, the regulator comes from a file that holds none
        (dict(init=fits, regulator=save_init(tmp_path, {"prompt_learner.ctx": init_ctx}, name="d.safetensors")),
         PromptInitError, "holds no regulator"),
    ]
    for kwargs, error, message in cases:
        trainer = build(CoOp, make_cfg(n_ctx=4))
        state = trainer_state(trainer)
        with pytest.raises(error, match=message):
            wrap(trainer, **kwargs)
        assert_untouched(trainer, state)
        wrap(trainer, init=fits)  # and the trainer can still be wrapped afterwards

    # no optimiser owns the prompts: found before the init is copied
    trainer = build(CoOp, make_cfg(n_ctx=4))
    trainer._optims = {"prompt_learner": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}
    trainer.optim = trainer._optims["prompt_learner"]
    state = trainer_state(trainer)
    with pytest.raises(AdapterError, match="no registered optimiser"):
        wrap(trainer, init=fits)
    assert_untouched(trainer, state)


def test_prograd_threshold_transform():
    from gram_plugin.transforms import PROGRAD_MIN_RELATIVE_NORM, prograd

    assert PROGRAD_MIN_RELATIVE_NORM == 1e-3
    gd = torch.tensor([1.0, 0.0])
    for ratio, expected in [(0.9e-3, gd), (1.1e-3, torch.tensor([0.5, 0.5]))]:
        gg = ratio / 2**0.5 * torch.tensor([-1.0, 1.0])  # ||gg|| / ||gd|| = ratio, conflicting
        out = prograd(1.0)({"p": gd}, general_grads={"p": gg})["p"]
        assert torch.allclose(out, expected, atol=1e-6), ratio
    tiny = 1e-8 * torch.tensor([-1.0, 1.0])
    assert torch.equal(prograd(1.0)({"p": gd}, general_grads={"p": tiny})["p"], gd)
    assert torch.allclose(prograd(1.0, min_relative_norm=0)({"p": gd}, general_grads={"p": tiny})["p"],
                          torch.tensor([0.5, 0.5]), atol=1e-6)
    with pytest.raises(ValueError, match="min_relative_norm"):
        prograd(1.0, min_relative_norm=-1.0)


def test_prograd_leaves_the_first_step_from_the_hand_prompt_alone():
    # CTX_INIT and no init: the prompted model IS the zero-shot teacher, G_g is rounding noise
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    handle = wrap(trainer, prograd=1.0)
    ctx = trainer.model.prompt_learner.ctx
    p0 = ctx.detach().clone()
    batch = make_batch(seed=0)
    logits = trainer.model(batch["img"])
    (gd,) = torch.autograd.grad(F.cross_entropy(logits, batch["label"]), [ctx], retain_graph=True)
    teacher = handle.teacher.logits(batch["img"])
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    (gg,) = torch.autograd.grad(kl, [ctx])
    assert gg.norm() < 1e-3 * gd.norm()  # noise, far below the threshold
    trainer.forward_backward(batch)
    assert torch.allclose(ctx.detach(), sgd_first_step(p0, gd), atol=1e-7, rtol=1e-5)  # plain SGD
