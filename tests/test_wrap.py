"""wrap's config (explicit arguments beat cfg.GRAM), its checks before anything is touched (the
regulator's width, a missing regulator file, an init learned for another trainer), the adapter
contract checked at registration, and what ``import gram_plugin.adapters`` imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fixtures.dassl_like import CoCoOp, CoOp, assert_untouched, build, make_batch, make_cfg, trainer_state
from fixtures.hand import random_regulator, regulate_by_hand, save_init
from gram_plugin import ConfigError, GradientRegulator, PromptInit, PromptInitError
from gram_plugin.adapters import (
    AdapterError,
    DasslAdapter,
    WrapConfig,
    adapter_for,
    contract_problems,
    register_adapter,
    supported_trainers,
    wrap,
)
from gram_plugin.adapters import base as adapter_base
from gram_plugin.adapters.trainers.coop import CoOpAdapter
from gram_plugin.adapters.trainers.kgcoop import KgCoOpAdapter

LR, WD = 0.002, 5e-4
CTX = "prompt_learner.ctx"


def sgd_first_step(p, g):
    return p - LR * (g + WD * p)


def ce_grad(trainer, batch):
    (g,) = torch.autograd.grad(F.cross_entropy(trainer.model(batch["img"]), batch["label"]), [trainer.model.prompt_learner.ctx])
    return g


@pytest.fixture
def registry():
    """The adapter registry, restored after the test (registrations here must not leak)."""
    saved = dict(adapter_base._REGISTRY)
    yield adapter_base._REGISTRY
    adapter_base._REGISTRY.clear()
    adapter_base._REGISTRY.update(saved)


# ---------------------------------------------------------------------------------------------
# the adapter contract, checked at registration
def test_duplicate_registration_is_refused_unless_asked(registry):
    class OtherCoOpAdapter(DasslAdapter):
        family = "OtherCoOp"
        forward_output = "logits"

    with pytest.raises(AdapterError, match=r"trainer 'CoOp' already has an adapter \(.*CoOpAdapter\); .*replace=True"):
        register_adapter("CoOp")(OtherCoOpAdapter)
    assert registry["CoOp"] is CoOpAdapter  # unchanged
    register_adapter("CoOp", replace=True)(OtherCoOpAdapter)
    assert type(adapter_for(build(CoOp, make_cfg()))) is OtherCoOpAdapter
    register_adapter("CoOp", replace=True)(CoOpAdapter)
    register_adapter("CoOp")(CoOpAdapter)  # the same class again (a re-import) is no conflict


def test_a_subclass_must_state_its_own_family_and_forward_output(registry):
    # a TCP adapter on KgCoOp's: inheriting family would export "GRAM-KgCoOp" for TCP
    class TCPAdapter(KgCoOpAdapter):
        forward_output = "logits_first"

    with pytest.raises(AdapterError, match=r"must state its own `family` \(it would inherit 'KgCoOp' from KgCoOpAdapter\)"):
        register_adapter("TCP")(TCPAdapter)

    class TCPNoForward(KgCoOpAdapter):
        family = "TCP"

    with pytest.raises(AdapterError, match=r"must state its own `forward_output` \(it would inherit 'logits_first'"):
        register_adapter("TCP")(TCPNoForward)
    assert "TCP" not in supported_trainers()

    class TCPGood(KgCoOpAdapter):
        family = "TCP"
        forward_output = "logits_first"

    register_adapter("TCP")(TCPGood)
    assert "TCP" in supported_trainers()
    assert TCPGood.__new__(TCPGood).method_name(regulator=True) == "GRAM-TCP"


def test_inherited_model_logits_and_inconsistent_declarations_are_refused():
    class Parent(DasslAdapter):
        family = "Parent"
        forward_output = "logits"

        def model_logits(self, model, images):  # a trainer-specific override
            return model(images)["logits"]

    class Child(Parent):
        family = "Child"
        forward_output = "logits"

    assert any("inherits Parent.model_logits" in p for p in contract_problems(Child))

    class OwnForward(CoOpAdapter):  # CoOp's own-forward G_g on a forward that returns the loss
        family = "X"
        forward_output = "loss_while_training"

    assert any("logits_from_own_forward is True" in p for p in contract_problems(OwnForward))

    class Bad(DasslAdapter):
        family = ""
        forward_output = "scores"
        prompt_pattern = "(unclosed"
        teacher = object
        clip_widths = (512, 700)

    problems = contract_problems(Bad)
    for word in ("family must be", "forward_output must be one of", "not a regular expression", "teacher must be",
                 "clip_widths must be"):
        assert any(word in p for p in problems), word
    assert contract_problems(CoOpAdapter) == [] and contract_problems(KgCoOpAdapter) == []


def test_package_import_registers_the_trainer_adapters_only():
    probe = (
        "import sys, importlib, pkgutil, gram_plugin.adapters as a, gram_plugin.adapters.trainers as t\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('gram_plugin.adapters.') and '.trainers' not in m)\n"
        "owners = {c.__module__ for c in a.base._REGISTRY.values()}\n"
        "files = {t.__name__ + '.' + m.name for m in pkgutil.iter_modules(t.__path__)}\n"
        "print(','.join(loaded)); print(','.join(a.supported_trainers())); print(owners == files)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split("\n")
    # the wrap's own modules, never meta-training, the CLI command or the Dassl compat fixes
    assert set(out[0].split(",")) == {f"gram_plugin.adapters.{m}" for m in ("base", "config", "general_gradients", "wrapping")}
    assert {"CoOp", "ProGrad", "CoCoOp", "KgCoOp", "VPT", "IVLP", "MaPLe", "PromptSRC"} <= set(out[1].split(","))
    assert out[2] == "True"  # every file in trainers/ registers an adapter, and every adapter lives there


def test_meta_train_cfg_forces_what_the_adapter_declares(registry):
    cfg = make_cfg()
    assert CoOpAdapter.meta_train_cfg(cfg) == [("TRAINER.COOP.PREC", "fp32")]

    class NeedsMore(CoOpAdapter):
        family = "NeedsMore"
        forward_output = "logits"
        meta_train_options = {"TRAINER.{node}.PREC": "fp32", "TRAINER.COOP.CSC": False, "TRAINER.COOP.NOT_THERE": 1}

    assert NeedsMore.meta_train_cfg(cfg) == [("TRAINER.COOP.PREC", "fp32"), ("TRAINER.COOP.CSC", False)]


# ---------------------------------------------------------------------------------------------
# the config: explicit arguments always win
def test_explicit_arguments_beat_cfg_gram(tmp_path):
    reg = random_regulator({CTX: (4, 32)})
    path = save_init(tmp_path, {CTX: torch.full((4, 32), 0.25)}, reg, backbone="ViT-B/16")

    # GRAM.STRICT False in the cfg, strict=True given: the caller's value is used (CoCoOp's meta_net is missing)
    cfg = make_cfg(trainer="CoCoOp", gram={})
    cfg.merge_from_list(["GRAM.ENABLED", "True", "GRAM.INIT", str(path)])
    trainer = build(CoCoOp, cfg)
    with pytest.raises(PromptInitError, match="missing in init: prompt_learner.meta_net"):
        wrap(trainer, strict=True)
    assert wrap(trainer).init_names == [CTX]  # and the cfg's own STRICT False when not given

    # GRAM.ENABLED False: the node contributes nothing, the caller's arguments still apply
    off = build(CoOp, make_cfg(gram={}))
    handle = wrap(off, init=path, regulator=None)
    assert handle.enabled and torch.equal(off.model.prompt_learner.ctx.detach(), torch.full((4, 32), 0.25))
    assert handle.transform is None

    # field by field: the cfg's regulator stays, its ProGrad is switched off, the clip is the caller's
    cfg = make_cfg(ctx_init="a photo of a", gram={})
    cfg.merge_from_list(["GRAM.ENABLED", "True", "GRAM.INIT", str(path), "GRAM.PROGRAD", "True", "GRAM.PROGRAD_LAMBDA", "0.5"])
    assert repr(wrap(build(CoOp, cfg)).transform) == "chain(prograd(lam=0.5), regulate(GradientRegulator))"
    handle = wrap(build(CoOp, cfg), prograd=None, clip=2.0)
    assert repr(handle.transform) == "chain(regulate(GradientRegulator), clip_meta(gamma=2.0))"
    assert handle.config == WrapConfig(init=str(path), regulator="init", prograd=None, clip=2.0)

    # GRAM.BACKBONE refuses the init; backbone= given names the right one
    cfg.merge_from_list(["GRAM.BACKBONE", "RN50", "GRAM.PROGRAD", "False"])
    with pytest.raises(PromptInitError, match="init was learned on 'ViT-B/16', model is 'RN50'"):
        wrap(build(CoOp, cfg))
    assert wrap(build(CoOp, cfg), backbone="ViT-B/16").init_names == [CTX]

    # a WrapConfig given: cfg.GRAM is not read, keywords still replace its fields
    handle = wrap(build(CoOp, cfg), WrapConfig(init=path, regulator=None), clip=1.0)
    assert repr(handle.transform) == "clip_meta(gamma=1.0)"


def test_wrap_config_reports_every_bad_value_at_once():
    with pytest.raises(ConfigError) as e:
        WrapConfig(prograd=-1.0, clip="5", strict=1, regulator=3)
    assert len(e.value.problems) == 4
    assert WrapConfig(prograd=True, clip=0) == WrapConfig(prograd=1.0, clip=None)

    cfg = make_cfg(gram={})
    cfg.merge_from_list(["GRAM.ENABLED", "True", "GRAM.CLIP", "-1.0"])
    with pytest.raises(ConfigError, match=r"invalid cfg.GRAM: GRAM.CLIP must be a finite number > 0"):
        wrap(build(CoOp, cfg))
    with pytest.raises(TypeError, match="config must be a WrapConfig.*wrap\\(trainer, init=...\\)"):
        wrap(build(CoOp, make_cfg()), "init.safetensors")


# ---------------------------------------------------------------------------------------------
# the regulator against the prompt shapes, before anything is touched
def test_a_regulator_for_another_width_is_refused_and_the_trainer_left_unchanged(tmp_path):
    fits = save_init(tmp_path, {CTX: torch.ones(4, 32)}, name="fits.safetensors")
    # a regulator learned on a backbone whose text width is 64 (the tiny CLIP's is 32)
    other = save_init(tmp_path, {CTX: torch.ones(4, 64)}, random_regulator({CTX: (4, 64)}), name="vit_l.safetensors")
    trainer = build(CoOp, make_cfg(n_ctx=4))
    state = trainer_state(trainer)
    with pytest.raises(AdapterError, match=r"regulator file .*vit_l.safetensors\) was learned for another embedding width"
                                           r".*takes width 64 .*the tensor has width 32"):
        wrap(trainer, init=fits, regulator=other)
    assert_untouched(trainer, state)  # the init was not copied, no hook installed

    cfg = make_cfg(n_ctx=4, gram={})  # the same through cfg.GRAM.REGULATOR
    cfg.merge_from_list(["GRAM.ENABLED", "True", "GRAM.INIT", str(fits), "GRAM.REGULATOR", str(other)])
    trainer = build(CoOp, cfg)
    state = trainer_state(trainer)
    with pytest.raises(AdapterError, match="another embedding width"):
        wrap(trainer)
    assert_untouched(trainer, state)


def test_a_regulator_for_another_n_ctx_is_accepted_and_regulates_each_token(tmp_path):
    # its maps act on the width and are shared across tokens: 16 context tokens learned, 4 here
    reg = random_regulator({CTX: (16, 32)}, seed=3)
    trainer = build(CoOp, make_cfg(n_ctx=4))
    handle = wrap(trainer, regulator=save_init(tmp_path, {CTX: torch.zeros(16, 32)}, reg))
    p0 = trainer.model.prompt_learner.ctx.detach().clone()
    batch = make_batch(seed=2)
    g = ce_grad(trainer, batch)
    trainer.forward_backward(batch)
    assert handle.hooks[0].steps == 1
    assert torch.allclose(trainer.model.prompt_learner.ctx.detach(), sgd_first_step(p0, regulate_by_hand(reg, CTX, g)),
                          atol=1e-7, rtol=1e-5)


def test_a_separate_regulator_file_named_for_the_standalone_model_is_renamed(tmp_path):
    reg = random_regulator({"ctx": (4, 32)}, seed=5)  # PromptedCLIP names its context "ctx"
    trainer = build(CoOp, make_cfg(n_ctx=4))
    handle = wrap(trainer, regulator=save_init(tmp_path, {"ctx": torch.zeros(4, 32)}, reg))
    assert handle.regulator.has_head(CTX) and not handle.regulator.has_head("ctx")
    p0 = trainer.model.prompt_learner.ctx.detach().clone()
    batch = make_batch(seed=1)
    g = ce_grad(trainer, batch)
    trainer.forward_backward(batch)
    assert torch.allclose(trainer.model.prompt_learner.ctx.detach(), sgd_first_step(p0, regulate_by_hand(reg, "ctx", g)),
                          atol=1e-7, rtol=1e-5)


def test_a_missing_regulator_file_is_named_as_a_regulator(tmp_path):
    trainer = build(CoOp, make_cfg(n_ctx=4))
    state = trainer_state(trainer)
    with pytest.raises(PromptInitError, match=r"^regulator file .*nowhere.safetensors does not exist$"):
        wrap(trainer, init=save_init(tmp_path, {CTX: torch.ones(4, 32)}), regulator=tmp_path / "nowhere.safetensors")
    assert_untouched(trainer, state)
    with pytest.raises(PromptInitError, match=r"^init file .*none.safetensors does not exist$"):
        wrap(trainer, init=tmp_path / "none.safetensors")


def test_an_init_learned_for_another_trainer_says_which(tmp_path):
    from fixtures import dassl_vpt_family

    maple = dassl_vpt_family.build("MaPLe")
    params = adapter_for(maple).prompt_parameters()
    # what meta_train writes for MaPLe (adapters/meta.py records the trainer and the method)
    init = PromptInit({n: p.detach().clone() for n, p in params.items()},
                      {"method_name": "GRAM-MaPLe", "trainer": "MaPLe"})
    path = init.save(tmp_path / "maple.safetensors")
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    state = trainer_state(trainer)
    with pytest.raises(PromptInitError) as e:
        wrap(trainer, init=path)
    message = str(e.value)
    assert message.startswith(f"init {path} was learned for the MaPLe trainer (GRAM-MaPLe), not CoOp: ")
    assert "\n" not in message and len(message) < 400 and "--trainer CoOp" in message
    assert_untouched(trainer, state)

    # a fork's subclass of the trainer the init was learned for: the ordinary list of mismatches
    class MyCoOp(CoOp):
        pass

    coop_init = save_init(tmp_path, {CTX: torch.ones(16, 32)}, name="coop16.safetensors", trainer="CoOp")
    with pytest.raises(PromptInitError, match=r"init does not fit the model:\n  - shape of prompt_learner.ctx"):
        wrap(build(MyCoOp, make_cfg(ctx_init="a photo of a")), init=coop_init)


# ---------------------------------------------------------------------------------------------
# ProGrad's G_g reaches the step as an explicit argument, for that step only
def test_prograd_general_gradients_never_reach_another_step():
    trainer = build(CoOp, make_cfg(ctx_init="a photo of a"))
    handle = wrap(trainer, prograd=1.0)
    trainer.forward_backward(make_batch(seed=0))
    assert handle.hooks[0].steps == 1 and handle.hooks[0].arguments.pending == {}
    # an optimiser step outside forward_backward has no G_g of its own: refused, not a stale one used
    batch = make_batch(seed=1)
    trainer.optim.zero_grad()
    F.cross_entropy(trainer.model(batch["img"]), batch["label"]).backward()
    with pytest.raises(KeyError, match="general_grads"):
        trainer.optim.step()
    handle.remove()
    assert "forward_backward" not in trainer.__dict__ and not trainer.model._forward_hooks


def test_regulator_renamed_keeps_every_head():
    reg = random_regulator({"ctx": (4, 8), "vpt.0": (2, 8)}, seed=2)
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    renamed = reg.renamed({"ctx": CTX, "absent": "x"})
    assert list(renamed.shapes) == [CTX, "vpt.0"]
    assert torch.equal(renamed(CTX, g), reg("ctx", g)) and torch.equal(renamed("vpt.0", g[:2]), reg("vpt.0", g[:2]))
    shared = GradientRegulator({"a": (2, 8), "b": (3, 8)}, share_by_width=True).renamed({"a": "c"})
    assert set(shared.shapes) == {"c", "b"} and set(shared.heads) == {"width_8"}
    with pytest.raises(ValueError, match="same name"):
        reg.renamed({"ctx": "vpt.0"})
