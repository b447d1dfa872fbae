"""The KgCoOp adapter (adapters/trainers/kgcoop.py) on a replica of htyao89/KgCoOp ``trainers/kgcoop.py``.

The replica keeps what the adapter relies on: CoOp's prompt learner under ``TRAINER.COOP`` plus the
frozen ``bias_vectors`` / ``meta_net`` the trainer leaves untrained (only names with ``ctx`` train),
the hand-crafted text features ``prompt_learner.text_features`` = ``model.ori_embedding`` from
``CUSTOM_TEMPLATES[DATASET.NAME]``, a forward returning ``(logits, score)`` and the loss
``CE + W * score`` stepped through ``model_backward_and_update``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_tiny_clip
from fixtures.dassl_like import (
    CLASSNAMES,
    CoOpCustomCLIP,
    CoOpPromptLearner,
    TrainerX,
    ZeroShotCLIP,
    build_lr_scheduler,
    build_optimizer,
    make_batch,
    make_cfg,
    tokenize,
)
from fixtures.hand import random_regulator, regulate_by_hand
from gram_plugin import PromptInit
from gram_plugin.adapters import adapter_for, wrap
from gram_plugin.adapters.trainers.kgcoop import KgCoOpAdapter
from gram_plugin.adapters.meta import ClassBuffers, meta_train
from gram_plugin.meta import MetaConfig

CUSTOM_TEMPLATES = {"Caltech101": "a photo of a {}."}  # read by the adapter from the trainer's module
W = 8.0
OTHER = ["kangaroo", "laptop", "sunflower"]


class KgCoOpPromptLearner(CoOpPromptLearner):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg.TRAINER.COOP, classnames, clip_model)
        self.bias_vectors = nn.Parameter(0.02 * torch.randn(1, clip_model.ln_final.weight.shape[0]))
        template = CUSTOM_TEMPLATES[cfg.DATASET.NAME]
        with torch.no_grad():
            t = clip_model.encode_text(tokenize([template.format(c.replace("_", " ")) for c in classnames]))
        self.text_features = t / t.norm(dim=-1, keepdim=True)
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(32, 32)), ("relu", nn.ReLU(inplace=True))]))


class KgCoOpCustomCLIP(CoOpCustomCLIP):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__(cfg.TRAINER.COOP, classnames, clip_model)
        self.prompt_learner = KgCoOpPromptLearner(cfg, classnames, clip_model)
        self.ori_embedding = self.prompt_learner.text_features

    def forward(self, image):
        logits = super().forward(image)
        t = self.text_encoder(self.prompt_learner(), self.tokenized_prompts)
        t = t / t.norm(dim=-1, keepdim=True)
        old = self.ori_embedding / self.ori_embedding.norm(dim=-1, keepdim=True)
        return logits, 1.0 - torch.mean(F.cosine_similarity(t, old, dim=1, eps=1e-07))


class KgCoOp(TrainerX):
    def build_model(self):
        cfg = self.cfg
        self.model = KgCoOpCustomCLIP(cfg, self.classnames, self.clip_factory())
        self.w = cfg.TRAINER.COOP.W
        for name, p in self.model.named_parameters():
            if "ctx" not in name:
                p.requires_grad_(False)
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)

    def forward_backward(self, batch):
        image, label = self.parse_batch_train(batch)
        output, score = self.model(image)
        loss = F.cross_entropy(output, label) + self.w * score
        self.model_backward_and_update(loss)
        return {"loss": loss.item()}


def build_kgcoop(classnames=CLASSNAMES, ctx_init="a photo of a", w=W):
    cfg = make_cfg(trainer="KgCoOp", ctx_init=ctx_init)
    cfg.TRAINER.COOP.W = w
    return KgCoOp(cfg, list(classnames), lambda: make_tiny_clip(0))


def test_adapter_selects_ctx_and_steps_on_the_kgcoop_loss(tmp_path):
    trainer = build_kgcoop()
    adapter = adapter_for(trainer)
    assert isinstance(adapter, KgCoOpAdapter)
    assert list(adapter.prompt_parameters()) == ["prompt_learner.ctx"]  # bias_vectors / meta_net stay frozen

    ctx = trainer.model.prompt_learner.ctx
    init_ctx = 0.3 * torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    reg = random_regulator({"prompt_learner.ctx": (4, 32)})
    init = PromptInit({"prompt_learner.ctx": init_ctx}, {"method": "test"},
                      {k: v.clone() for k, v in reg.state_dict().items()})
    init.metadata["regulator_config"] = reg.to_config()
    wrap(trainer, init=init.save(tmp_path / "init.safetensors"), regulator=True)
    assert torch.equal(ctx.detach(), init_ctx)

    batch = make_batch(seed=1)
    logits, score = trainer.model(batch["img"])
    loss = F.cross_entropy(logits, batch["label"]) + W * score
    (g,) = torch.autograd.grad(loss, [ctx])
    assert torch.allclose(adapter.method_loss(trainer.model, batch["img"], batch["label"]), loss)
    trainer.forward_backward(batch)
    expected = init_ctx - 0.002 * (regulate_by_hand(reg, "prompt_learner.ctx", g) + 5e-4 * init_ctx)
    assert torch.allclose(ctx.detach(), expected, atol=1e-7, rtol=1e-5)


def test_prograd_teacher_is_the_hand_crafted_text_and_the_step_is_projected():
    w = 1.0  # upstream's default weight; at W = 8 the text-distance term aligns G_d with G_g everywhere
    trainer = build_kgcoop(w=w)
    with torch.no_grad():
        trainer.model.prompt_learner.ctx.add_(torch.randn(4, 32, generator=torch.Generator().manual_seed(4)))
    handle = wrap(trainer, prograd=1.0)
    zero_shot = ZeroShotCLIP(make_tiny_clip(0), CLASSNAMES, CUSTOM_TEMPLATES["Caltech101"])
    ctx = trainer.model.prompt_learner.ctx
    projected = 0
    for seed in range(6):
        batch = make_batch(seed=seed)
        teacher = zero_shot(batch["img"]).detach()
        assert torch.allclose(handle.teacher.logits(batch["img"]), teacher, atol=1e-5)
        p0 = ctx.detach().clone()
        logits, score = trainer.model(batch["img"])
        (gd,) = torch.autograd.grad(F.cross_entropy(logits, batch["label"]) + w * score, [ctx], retain_graph=True)
        kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="batchmean")
        (gg,) = torch.autograd.grad(kl, [ctx])
        dot = torch.sum(gd * gg)
        g = gd - dot / torch.sum(gg * gg) * gg if dot < 0 else gd
        projected += bool(dot < 0)
        momentum = trainer.optim.state[ctx].get("momentum_buffer")
        d = g + 5e-4 * p0
        expected = p0 - 0.002 * (d if momentum is None else 0.9 * momentum + d)  # before the step updates the buffer
        trainer.forward_backward(batch)
        assert torch.allclose(ctx.detach(), expected, atol=1e-7, rtol=1e-5), seed
    assert 0 < projected < 6


def test_meta_train_through_kgcoop_rebuilds_its_hand_crafted_text(caltech_root):
    import sys

    from torchvision import transforms as T

    from gram_plugin.data import NWayKShotTasks, caltech101, subsample_classes

    sys.modules[KgCoOp.__module__].CUSTOM_TEMPLATES = CUSTOM_TEMPLATES
    a, b = build_kgcoop(), build_kgcoop(OTHER)
    with torch.no_grad():
        b.model.prompt_learner.ctx.copy_(a.model.prompt_learner.ctx)
    adapter = adapter_for(a)
    buffers = ClassBuffers(adapter, make_tiny_clip(0), tokenize)
    images, labels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 3
    own = adapter.method_loss(a.model, images, labels)
    buffers.use(OTHER)  # a trainer built for OTHER computes the same loss (CE and the text-distance term)
    assert torch.allclose(adapter.method_loss(a.model, images, labels), adapter_for(b).method_loss(b.model, images, labels), atol=1e-6)
    buffers.restore()
    assert torch.equal(adapter.method_loss(a.model, images, labels), own)

    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    tasks = NWayKShotTasks(subsample_classes(caltech101(caltech_root / "caltech-101" / "101_ObjectCategories", tf), "base"), 2, 1, 1)
    config = MetaConfig(steps=2, meta_batch_size=1, inner_steps=1, inner_lr=0.05, outer_lr=0.01, clip_gamma=5.0, progress=False)
    before = a.model.prompt_learner.ctx.detach().clone()
    init = meta_train(a, tasks, config, clip_model=make_tiny_clip(0), tokenize=tokenize)
    assert init.metadata["method_name"] == "MP-KgCoOp+clip"
    assert list(init.tensors) == ["prompt_learner.ctx"] and not torch.equal(init.tensors["prompt_learner.ctx"], before)
    assert torch.equal(a.model.prompt_learner.ctx.detach(), before)
    assert a.model.ori_embedding is a.model.prompt_learner.text_features  # its own text restored
