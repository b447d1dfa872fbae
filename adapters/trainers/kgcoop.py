"""KgCoOp (Yao et al., CVPR 2023, "Visual-Language Prompt Tuning with Knowledge-guided Context
Optimization"; htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``).

Layout: CoOp's prompt learner under the ``TRAINER.COOP`` node; only ``prompt_learner.ctx``
``(n_ctx, ctx_dim)`` is trained (the trainer freezes every parameter whose name lacks ``ctx``, so
its unused ``bias_vectors`` and ``meta_net`` stay frozen although the optimiser holds the whole
prompt learner). ``register_model("prompt_learner", ...)``; fp16/fp32 step through
``model_backward_and_update``, amp through ``scaler.step``.

Its forward returns ``(logits, score)`` with ``score = 1 - mean_i cos(w_i, w_i^clip)``: the distance
of the prompted class text features to the hand-crafted ones (``CUSTOM_TEMPLATES[DATASET.NAME]``,
e.g. "a photo of a {}.", encoded once by the frozen CLIP: ``model.ori_embedding``). The loss is
``CE(logits) + TRAINER.COOP.W * score``. That hand-crafted text is also the zero-shot teacher ProGrad
needs: ``logit_scale * norm(image_encoder(x)) @ ori_embedding.T``.

Class-dependent state, rebuilt for each task when meta-training through the trainer: the prompt
learner's token buffers (as CoOp) and the hand-crafted text features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import AdapterError, ZeroShotTeacher, register_adapter, trainer_module
from .coop import CoOpAdapter


class HandCraftedTextTeacher(ZeroShotTeacher):
    """KgCoOp's zero-shot CLIP: ``logit_scale * norm(image_encoder(x)) @ norm(ori_embedding).T``."""

    @torch.no_grad()
    def logits(self, images):
        model = self.model
        return self.cosine_logits(model.image_encoder(images.type(model.dtype)), model.ori_embedding)


@register_adapter("KgCoOp")
class KgCoOpAdapter(CoOpAdapter):
    """KgCoOp: CoOp's ``ctx``, forward ``(logits, score)``, loss ``CE + W * score``, hand-crafted text teacher."""

    family = "KgCoOp"
    forward_output = "logits_first"  # its forward returns (logits, score)
    logits_from_own_forward = False
    teacher = HandCraftedTextTeacher

    def prepare(self) -> None:
        if getattr(self.model, "ori_embedding", None) is None:
            raise AdapterError("KgCoOp trainer without model.ori_embedding (the hand-crafted text features)")

    def method_loss(self, model, images, labels):
        """CE of the logits + ``TRAINER.COOP.W`` times the text-distance score (as its ``forward_backward``)."""
        logits, score = model(images)
        return F.cross_entropy(logits.float(), labels) + float(self.node.W) * score.float()

    def prompt_prefix(self) -> str:
        # upstream uses the fixed words "a photo of a" whenever CTX_INIT is truthy (its yaml sets True)
        if getattr(self.node, "CTX_INIT", ""):
            return "a photo of a"
        return " ".join(["X"] * self.prompt_learner.n_ctx)

    def text_template(self) -> str:
        """The dataset's hand-crafted template (``CUSTOM_TEMPLATES[DATASET.NAME]`` of the trainer's module)."""
        templates = getattr(trainer_module(self.trainer), "CUSTOM_TEMPLATES", {})
        name = self.trainer.cfg.DATASET.NAME
        if name not in templates:
            raise AdapterError(f"KgCoOp: no CUSTOM_TEMPLATES entry for dataset {name!r} in {type(self.trainer).__module__}")
        return templates[name]

    def class_buffers(self) -> dict:
        return {**super().class_buffers(), "ori_embedding": self.model.ori_embedding}

    @torch.no_grad()
    def build_class_buffers(self, classnames, clip_model, tokenize) -> dict:
        own = self.model.ori_embedding
        template = self.text_template()
        t = clip_model.encode_text(tokenize([template.format(c.replace("_", " ")) for c in classnames]))
        t = t / t.norm(dim=-1, keepdim=True)
        return {**super().build_class_buffers(classnames, clip_model, tokenize), "ori_embedding": t.to(own.device, own.dtype)}

    def use_class_buffers(self, state: dict) -> None:
        super().use_class_buffers(state)
        self.model.prompt_learner.text_features = state["ori_embedding"]
        self.model.ori_embedding = state["ori_embedding"]
