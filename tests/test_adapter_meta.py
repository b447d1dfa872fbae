"""Meta-training through a Dassl trainer's adapter (gram_plugin.adapters.meta), then tuning with the wrap.

The key property: for a task's classes, the trainer's model with rebuilt class buffers computes exactly
what a trainer *built for those classes* computes (same prompt tensors). Then a short meta-training
on real images (the embedded Caltech subset) per method, and the exported init loaded by a trainer
of another class split through ``wrap``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_clip
from fixtures import dassl_like
from fixtures.dassl_vpt_family import CLASSNAMES, build, tokenize
from gram_plugin.adapters import AdapterError, adapter_for, wrap
from gram_plugin.adapters.meta import ClassBuffers, meta_train
from gram_plugin.data import NWayKShotTasks, default_dataset, subsample_classes
from gram_plugin.regulator import GradientRegulator
from gram_plugin.meta import MetaConfig
from gram_plugin.prompts import PromptInit

OTHER = ["kangaroo", "laptop", "sunflower"]
METHODS = ["CoOp", "VPT", "IVLP", "MaPLe", "PromptSRC"]


def build_any(method, classnames=CLASSNAMES, **kw):
    if method == "CoOp":
        cfg = dassl_like.make_cfg(n_ctx=kw.pop("n_ctx", 2), ctx_init=kw.pop("ctx_init", ""), **kw)
        return dassl_like.CoOp(cfg, classnames, lambda: make_tiny_clip(0))
    return build(method, classnames=list(classnames), **kw)


def batch_for(n_cls, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % n_cls


@pytest.mark.parametrize("method", METHODS)
def test_rebuilt_class_buffers_equal_a_trainer_built_for_those_classes(method):
    a = build_any(method)
    b = build_any(method, classnames=OTHER)
    pa, pb = adapter_for(a).prompt_parameters(), adapter_for(b).prompt_parameters()
    with torch.no_grad():
        for n, p in pa.items():  # same prompt tensors in both
            pb[n].copy_(p)
    adapter = adapter_for(a)
    buffers = ClassBuffers(adapter, make_tiny_clip(0), tokenize)
    images, labels = batch_for(len(OTHER))
    own_labels = labels % len(CLASSNAMES)
    own_loss = adapter.method_loss(a.model, images, own_labels)
    own_logits = adapter.prompted_logits(images)
    expected = adapter_for(b).method_loss(b.model, images, labels)
    buffers.use(OTHER)
    got = adapter.method_loss(a.model, images, labels)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.allclose(adapter.prompted_logits(images), adapter_for(b).prompted_logits(images), atol=1e-6, rtol=1e-6)
    assert adapter.prompted_logits(images).shape == (6, len(OTHER))
    buffers.restore()
    # the trainer's own classes again: exactly what it computed before the swap
    assert torch.equal(adapter.prompted_logits(images), own_logits)
    assert torch.equal(adapter.method_loss(a.model, images, own_labels), own_loss)


def test_wrong_clip_csc_and_fp16_are_refused():
    trainer = build_any("IVLP")
    with pytest.raises(AdapterError, match="do not reproduce IVLP's own token_prefix"):
        ClassBuffers(adapter_for(trainer), make_tiny_clip(1), tokenize)
    csc = dassl_like.CoOp(dassl_like.make_cfg(n_ctx=2, csc=True), CLASSNAMES, lambda: make_tiny_clip(0))
    with pytest.raises(AdapterError, match="class-specific context"):
        ClassBuffers(adapter_for(csc), make_tiny_clip(0), tokenize)
    with pytest.raises(AdapterError, match="float32 trainer: .*build the trainer with the options TRAINER.IVLP.PREC fp32"):
        meta_train(build_any("IVLP", prec="fp16"), None, clip_model=make_tiny_clip(0), tokenize=tokenize)


@pytest.fixture(scope="module")
def real_tasks():
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    data = default_dataset(tf)
    base = subsample_classes(data, "base")  # meta-train on base classes; tune on the new ones
    new = subsample_classes(data, "new")
    return NWayKShotTasks(base, n_way=2, k_support=1, k_query=1), new


@pytest.mark.parametrize("method,regulator", [("CoOp", False), ("VPT", True), ("IVLP", True), ("MaPLe", False), ("PromptSRC", False)])
def test_meta_train_then_tune_round_trip(method, regulator, real_tasks, tmp_path):
    tasks, new = real_tasks
    trainer = build_any(method)
    params = adapter_for(trainer).prompt_parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    prefix_before = getattr(getattr(trainer.model, "prompt_learner", None), "token_prefix", None)
    config = MetaConfig(steps=2, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, clip_gamma=5.0, progress=False)
    init = meta_train(trainer, tasks, config, clip_model=make_tiny_clip(0), tokenize=tokenize, regulator=regulator)

    # every learnable tensor meta-learned, named as the trainer names it; the trainer itself untouched
    assert list(init.tensors) == list(params)
    assert all(init.tensors[n].shape == p.shape for n, p in params.items())
    assert any(not torch.equal(init.tensors[n], before[n]) for n in params)
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())
    if prefix_before is not None:
        assert trainer.model.prompt_learner.token_prefix is prefix_before  # its own class buffers restored
    expected_name = {"CoOp": "MP-CoOp+clip", "VPT": "GRAM-VPT", "IVLP": "UNIGRAM", "MaPLe": "MP-MaPLe+clip", "PromptSRC": "MP-PromptSRC+clip"}[method]
    assert init.metadata["method_name"] == expected_name
    assert (GradientRegulator.from_init(init) is not None) == regulator
    path = init.save(tmp_path / "init.safetensors")

    # tune: a trainer for the *new* classes loads it with the wrap and trains on real images
    tuned = build_any(method, classnames=new.classnames)
    handle = wrap(tuned, init=PromptInit.load(path))
    assert sorted(handle.init_names) == sorted(params)
    for n, p in adapter_for(tuned).prompt_parameters().items():
        assert torch.equal(p.detach(), init.tensors[n])
    batch = new.batch(list(range(0, len(new), max(1, len(new) // 6)))[:6])
    tuned.forward_backward({"img": batch["images"], "label": batch["labels"]})
    moved = [n for n, p in adapter_for(tuned).prompt_parameters().items() if not torch.equal(p.detach(), init.tensors[n])]
    assert moved and all(torch.isfinite(p).all() for p in adapter_for(tuned).prompt_parameters().values())
    assert (len(handle.hooks) == 1) == regulator


def test_meta_train_maple_casts_upstreams_fp16_proj_under_prec_fp32(real_tasks):
    # upstream's MultiModalPromptLearner calls proj.half() whatever PREC says
    tasks, _ = real_tasks
    trainer = build_any("MaPLe")
    proj = trainer.model.prompt_learner.proj
    proj.half()
    weight = proj.weight
    config = MetaConfig(steps=1, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, progress=False)
    init = meta_train(trainer, tasks, config, clip_model=make_tiny_clip(0), tokenize=tokenize)
    assert proj.weight is weight and weight.dtype == torch.float32  # cast in place: the optimiser still holds it
    assert init.tensors["prompt_learner.proj.weight"].dtype == torch.float32
    assert any(weight is p for g in trainer.optim.param_groups for p in g["params"])


def test_meta_train_promptsrc_prec_fp32_with_upstreams_fp16_zero_shot_encoder(real_tasks):
    # upstream PromptSRC builds its frozen zero-shot encoder fp16 whatever PREC says and feeds it
    # image.type(self.dtype): under PREC fp32 its own forward fails. meta_train must run the teacher
    # in the encoder's own dtype.
    tasks, _ = real_tasks
    trainer = build_any("PromptSRC", zs_prec="fp16")
    zs = trainer.model.prompt_learner.ZS_image_encoder
    assert trainer.model.dtype == torch.float32 and zs.conv1.weight.dtype == torch.float16
    assert zs.class_embedding.dtype == torch.float32  # convert_weights' layout: not every tensor is fp16
    images, labels = batch_for(len(CLASSNAMES))
    with pytest.raises(RuntimeError, match="Input type .* and weight type .* should be the same"):
        trainer.compute_loss(images, labels)  # the replica fails as upstream does

    params = adapter_for(trainer).prompt_parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    zs_before = {n: p.detach().clone() for n, p in zs.named_parameters()}
    config = MetaConfig(steps=2, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, clip_gamma=5.0, progress=False)
    init = meta_train(trainer, tasks, config, clip_model=make_tiny_clip(0), tokenize=tokenize)

    assert list(init.tensors) == list(params)
    assert all(torch.isfinite(t).all() for t in init.tensors.values())
    assert any(not torch.equal(init.tensors[n], before[n]) for n in params)  # the prompts were meta-learned
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())  # the trainer itself untouched
    for n, p in zs.named_parameters():  # the teacher: unchanged, still in upstream's layout, no hook left
        assert p.dtype == zs_before[n].dtype and torch.equal(p.detach(), zs_before[n]), n
    assert not zs._forward_pre_hooks
    assert init.metadata["method_name"] == "MP-PromptSRC+clip"
