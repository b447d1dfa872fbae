"""VPT / IVLP / MaPLe / PromptSRC adapters on replicas of the upstream trainers
(tests/fixtures/dassl_vpt_family.py).

Each wrapped step is checked against a hand computation outside the trainer: the gradient by
``torch.autograd.grad`` on a fresh forward of the trainer's own loss, the regulator by its formula
(tanh(W g + b)) from its raw weights, ProGrad by its formula with the zero-shot teacher recomputed
from a fresh open_clip CLIP (``encode_image`` / ``encode_text``), SGD (momentum 0.9, weight decay
5e-4) by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_clip
from fixtures.hand import random_regulator, regulate_by_hand
from fixtures.dassl_vpt_family import TEMPLATES, build, convert_weights, make_batch, make_cfg, tokenize
from gram_plugin import PromptInit, PromptInitError
from gram_plugin.adapters import AdapterError, adapter_for, wrap

LR, WD = 0.0025, 5e-4

EXPECTED = {
    # D = 32 text width, W = 64 vision width, 2 prompt tokens, depth 2
    "VPT": {"image_encoder.VPT": (2, 64), "image_encoder.transformer.resblocks.1.VPT_shallow": (2, 64)},
    "IVLP": {
        "prompt_learner.ctx": (2, 32),
        "image_encoder.VPT": (2, 64),
        "image_encoder.transformer.resblocks.1.VPT_shallow": (2, 64),
        "text_encoder.transformer.resblocks.1.VPT_shallow": (2, 32),
    },
    "MaPLe": {
        "prompt_learner.ctx": (2, 32),
        "prompt_learner.proj.weight": (64, 32),
        "prompt_learner.proj.bias": (64,),
        "prompt_learner.compound_prompts_text.0": (2, 32),
        "prompt_learner.compound_prompt_projections.0.weight": (64, 32),
        "prompt_learner.compound_prompt_projections.0.bias": (64,),
    },
}
EXPECTED["PromptSRC"] = EXPECTED["IVLP"]
METHODS = list(EXPECTED)


def sgd_first_step(p, g):
    return p - LR * (g + WD * p)


def trainer_loss(trainer, batch):
    """The loss the trainer's forward_backward differentiates (fresh forward, train mode)."""
    return trainer.compute_loss(batch["img"], batch["label"])


def prompts_of(trainer):
    return {n: p for n, p in trainer.model.named_parameters() if n in EXPECTED[type(trainer).__name__]}


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_prompt_names_shapes_and_only_trainable_ones(method):
    trainer = build(method)
    adapter = adapter_for(trainer)
    assert adapter.describe() == EXPECTED[method]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(EXPECTED[method])  # the adapter selects every learnable tensor, nothing else
    if method == "PromptSRC":
        zs = [n for n, _ in trainer.model.named_parameters() if "ZS_image_encoder" in n]
        assert zs and not set(zs) & set(adapter.describe())  # frozen teacher inside prompt_learner: not a prompt


@pytest.mark.parametrize("method", METHODS)
def test_fp32_step_equals_hand_computed_regulated_step(method, tmp_path):
    trainer = build(method)
    params = prompts_of(trainer)
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})  # one regulator, all prompts (UNIGRAM)
    g = torch.Generator().manual_seed(3)
    init = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    path = PromptInit(init, {"method": method}).save(tmp_path / "init.safetensors")
    handle = wrap(trainer, init=path, regulator=reg)
    assert sorted(handle.init_names) == sorted(params)
    for n, p in params.items():
        assert torch.equal(p.detach(), init[n])
    owned = {id(q) for q in trainer.optim.param_groups[0]["params"]}
    assert all(id(p) in owned for p in params.values())  # swapped in place: the optimiser still holds them

    batch = make_batch(seed=0)
    names = list(params)
    grads = torch.autograd.grad(trainer_loss(trainer, batch), [params[n] for n in names])
    expected = {n: sgd_first_step(init[n], regulate_by_hand(reg, n, gr)) for n, gr in zip(names, grads)}
    plain = {n: sgd_first_step(init[n], gr) for n, gr in zip(names, grads)}
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.forward_backward(batch)
    for n in names:
        assert torch.allclose(params[n].detach(), expected[n], atol=1e-7, rtol=1e-5), n
    assert any(not torch.allclose(params[n].detach(), plain[n], atol=1e-7, rtol=1e-5) for n in names)
    for n, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen_before[n]), n  # incl. PromptSRC's ZS_image_encoder
    assert handle.hooks[0].steps == 1


@pytest.mark.parametrize("method", ["IVLP", "MaPLe"])
def test_fp16_mixed_dtype_prompts_step_matches(method):
    # under PREC fp16 ctx (and MaPLe's proj) are half, VPT / compound prompts stay float32
    trainer = build(method, prec="fp16")
    params = prompts_of(trainer)
    dtypes = {n: p.dtype for n, p in params.items()}
    assert dtypes["prompt_learner.ctx"] == torch.float16
    assert torch.float32 in dtypes.values()
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})
    wrap(trainer, regulator=reg)
    batch = make_batch(seed=0)
    names = list(params)
    p0 = {n: params[n].detach().float().clone() for n in names}
    grads = torch.autograd.grad(trainer_loss(trainer, batch), [params[n] for n in names])
    expected = {n: sgd_first_step(p0[n], regulate_by_hand(reg, n, gr).to(gr.dtype).float()) for n, gr in zip(names, grads)}
    trainer.forward_backward(batch)
    for n in names:
        assert params[n].dtype == dtypes[n] and torch.isfinite(params[n]).all()
        assert torch.allclose(params[n].detach().float(), expected[n], atol=2e-3), n


@pytest.mark.parametrize("method", ["VPT", "PromptSRC"])
def test_amp_regulates_unscaled_gradients(method):
    trainer = build(method, prec="amp")
    params = prompts_of(trainer)
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})
    handle = wrap(trainer, regulator=reg)
    batch = make_batch(seed=0)
    names = list(params)
    p0 = {n: params[n].detach().clone() for n in names}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer_loss(trainer, batch)
    grads = torch.autograd.grad(loss, [params[n] for n in names])  # no scaler: the unscaled gradient
    trainer.forward_backward(batch)
    assert trainer.scaler.get_scale() > 1  # the loss really was scaled
    for n, gr in zip(names, grads):
        assert torch.allclose(params[n].detach(), sgd_first_step(p0[n], regulate_by_hand(reg, n, gr)), atol=1e-6, rtol=1e-4), n
    assert handle.hooks[0].steps == 1


# ---------------------------------------------------------------------------------------------
def test_promptsrc_gpa_aggregates_the_regulated_weights():
    # 2 epochs of one batch: GPA = g1 * (weights after epoch 1) + g2 * (weights after epoch 2), loaded at the end
    trainer = build("PromptSRC", max_epoch=2)
    trainer.num_batches = 1
    params = prompts_of(trainer)
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})
    handle = wrap(trainer, regulator=reg)
    names = list(params)
    snapshots = []
    for epoch in range(2):
        trainer.batch_idx = 0
        batch = make_batch(seed=epoch)
        if epoch == 0:
            p0 = {n: params[n].detach().clone() for n in names}
            grads = torch.autograd.grad(trainer_loss(trainer, batch), [params[n] for n in names])
        hooked = trainer.model.load_state_dict

        def spy(state, *a, **k):  # snapshot the weights right before GPA overwrites them
            snapshots.append({n: params[n].detach().clone() for n in names})
            return hooked(state, *a, **k)

        trainer.model.load_state_dict = spy
        before = {n: params[n].detach().clone() for n in names}
        trainer.forward_backward(batch)
        del trainer.model.load_state_dict
        if epoch == 0:
            first = {n: params[n].detach().clone() for n in names}
            for n, gr in zip(names, grads):
                assert torch.allclose(first[n], sgd_first_step(p0[n], regulate_by_hand(reg, n, gr)), atol=1e-7, rtol=1e-5)
            assert not snapshots  # no GPA load before the last epoch
    assert len(snapshots) == 1 and handle.hooks[0].steps == 2
    g1, g2 = trainer.gauss
    assert abs(g1 + g2 - 1) < 1e-12
    for n in names:
        expected = g1 * first[n] + g2 * snapshots[0][n]
        assert torch.allclose(params[n].detach(), expected, atol=1e-7, rtol=1e-5), n
        assert not torch.allclose(params[n].detach(), before[n])
    # the parameters GPA loaded into are still the ones the optimiser and the hook hold
    assert trainer.model.prompt_learner.ctx is params["prompt_learner.ctx"]
    assert handle.hooks[0].params["prompt_learner.ctx"] is params["prompt_learner.ctx"]


def zero_shot_reference(batch, seed=0):
    """PromptSRC's teacher from a fresh CLIP through open_clip's own encode_image / encode_text."""
    from fixtures.dassl_like import CLASSNAMES

    clip = make_tiny_clip(seed)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    with torch.no_grad():
        t = torch.stack([clip.encode_text(tokenize([tpl.format(n) for n in names])) for tpl in TEMPLATES], 1).mean(1)
        f = clip.encode_image(batch["img"])
    f, t = F.normalize(f, dim=-1), F.normalize(t, dim=-1)
    return clip.logit_scale.exp() * f @ t.t()


def test_promptsrc_prograd_uses_its_own_zero_shot_teacher_then_regulates():
    trainer = build("PromptSRC")
    adapter = adapter_for(trainer)
    batch = make_batch(seed=2)
    assert torch.allclose(adapter.make_teacher().logits(batch["img"]), zero_shot_reference(batch), atol=1e-5, rtol=1e-5)

    params = prompts_of(trainer)
    names = list(params)
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()}, seed=4)
    lam = 0.8
    handle = wrap(trainer, regulator=reg, prograd=lam)
    p0 = {n: params[n].detach().clone() for n in names}
    g_d = torch.autograd.grad(trainer_loss(trainer, batch), [params[n] for n in names])
    teacher = zero_shot_reference(batch)
    student = adapter.prompted_logits(batch["img"])
    assert student.shape == (4, 5)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    g_g = torch.autograd.grad(kl, [params[n] for n in names])
    projected, expected, unprojected = [], {}, {}
    for n, d, gg in zip(names, g_d, g_g):
        unprojected[n] = sgd_first_step(p0[n], regulate_by_hand(reg, n, d))
        dot = (d * gg).sum()
        if dot < 0:
            projected.append(n)
            d = d - lam * dot / (gg * gg).sum() * gg
        expected[n] = sgd_first_step(p0[n], regulate_by_hand(reg, n, d))
    assert projected  # this batch has conflicting tensors, so the projection is exercised
    trainer.forward_backward(batch)
    for n in names:
        assert torch.allclose(params[n].detach(), expected[n], atol=1e-6, rtol=1e-4), n
        if n in projected:
            assert not torch.allclose(params[n].detach(), unprojected[n], atol=1e-6, rtol=1e-4), n
    assert handle.hooks[0].steps == 1 and handle.hooks[0].arguments.pending == {}


def test_promptsrc_teacher_with_upstreams_fp16_zero_shot_encoder_under_prec_fp32():
    # upstream's layout: the zero-shot encoder fp16 (convert_weights) whatever PREC says; under PREC fp32
    # the trainer's own forward feeds it fp32 images and fails, the ProGrad teacher must not
    from fixtures.dassl_like import CLASSNAMES

    trainer = build("PromptSRC", zs_prec="fp16")
    zs = trainer.model.prompt_learner.ZS_image_encoder
    assert trainer.model.dtype == torch.float32 and zs.conv1.weight.dtype == torch.float16
    batch = make_batch(seed=2)
    with pytest.raises(RuntimeError, match="Input type .* and weight type .* should be the same"):
        trainer_loss(trainer, batch)  # the replica fails as upstream does
    got = adapter_for(trainer).make_teacher().logits(batch["img"])

    # by hand: a fresh CLIP's fp32 text features (mean over templates), its image tower converted as
    # upstream's loader does, fed the images cast to fp16
    clip = make_tiny_clip(0)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    with torch.no_grad():
        t = torch.stack([clip.encode_text(tokenize([tpl.format(n) for n in names])) for tpl in TEMPLATES], 1).mean(1)
        visual = convert_weights(clip.visual)
        f = visual(batch["img"].half())
    assert f.dtype == torch.float16
    f, t = F.normalize(f.float(), dim=-1), F.normalize(t, dim=-1)
    expected = clip.logit_scale.exp() * f @ t.t()
    assert got.dtype == torch.float32 and got.shape == (4, 5)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    fp32_teacher = zero_shot_reference(batch)  # the same CLIP in fp32: only fp16 rounding apart
    assert not torch.equal(got, fp32_teacher) and torch.allclose(got, fp32_teacher, atol=1e-2, rtol=0)


def test_promptsrc_refuses_an_unfrozen_zero_shot_encoder_and_others_need_a_teacher():
    trainer = build("PromptSRC")
    next(trainer.model.prompt_learner.ZS_image_encoder.parameters()).requires_grad_(True)
    with pytest.raises(AdapterError, match="zero-shot image encoder must stay frozen"):
        wrap(trainer, regulator=None, prograd=1.0)
    for method in ("VPT", "IVLP", "MaPLe"):
        with pytest.raises(AdapterError, match="no zero-shot teacher"):
            wrap(build(method), regulator=None, prograd=1.0)


def test_ivlp_prograd_with_a_user_teacher():
    trainer = build("IVLP")
    batch = make_batch(seed=1)
    handle = wrap(trainer, regulator=None, prograd=1.0, teacher=lambda images: zero_shot_reference({"img": images}))
    trainer.forward_backward(batch)
    assert handle.hooks[0].steps == 1


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_roundtrip_through_trainers_load_model(method, tmp_path):
    trainer = build(method)
    params = prompts_of(trainer)
    reg = random_regulator({n: tuple(p.shape) for n, p in params.items()})
    wrap(trainer, regulator=reg, clip=1.0)
    for seed in range(2):
        trainer.batch_idx = seed
        trainer.forward_backward(make_batch(seed=seed))
    for n, p in params.items():
        buf = trainer.optim.state[p]["momentum_buffer"]
        assert buf.shape == p.shape and torch.isfinite(buf).all()
    trainer.save_model(0, str(tmp_path / "out"))

    fresh = build(method)
    fresh.load_model(str(tmp_path / "out"), epoch=1)  # the trainer's own load_model (weights_only=True)
    for n, p in prompts_of(fresh).items():
        assert torch.equal(p.detach(), params[n].detach()), n
    # and the reloaded trainer wraps and trains again
    wrap(fresh, regulator=reg)
    fresh.forward_backward(make_batch(seed=5))


def test_init_aliases_from_the_standalone_names_and_shape_errors(tmp_path):
    trainer = build("IVLP")
    init = {"ctx": torch.full((2, 32), 0.5), "vpt.0": torch.full((2, 64), 0.25), "vpt.1": torch.full((2, 64), -0.25)}
    path = PromptInit(init, {"method": "unigram"}).save(tmp_path / "std.safetensors")
    handle = wrap(trainer, init=path, regulator=None)
    assert sorted(handle.init_names) == sorted(
        ["prompt_learner.ctx", "image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow"]
    )
    assert torch.equal(trainer.model.image_encoder.transformer.resblocks[1].VPT_shallow.detach(), init["vpt.1"])
    bad = PromptInit({"image_encoder.VPT": torch.zeros(4, 64)}, {}).save(tmp_path / "bad.safetensors")
    with pytest.raises(PromptInitError, match=r"image_encoder.VPT"):
        wrap(build("VPT"), init=bad, regulator=None)


def test_cfg_gram_node_drives_the_wrap(tmp_path):
    reg = random_regulator({"image_encoder.VPT": (2, 64)}, seed=2)
    init = PromptInit({"image_encoder.VPT": torch.full((2, 64), 0.1)}, {"regulator_config": reg.to_config()})
    init.regulator_state = {k: v.clone() for k, v in reg.state_dict().items()}
    path = init.save(tmp_path / "vpt.safetensors")
    cfg = make_cfg(trainer="VPT", gram={"ENABLED": True, "INIT": str(path)})
    trainer = build("VPT", cfg=cfg)
    handle = wrap(trainer)
    assert handle.init_names == ["image_encoder.VPT"] and handle.regulator is not None
    assert torch.equal(trainer.model.image_encoder.VPT.detach(), torch.full((2, 64), 0.1))
