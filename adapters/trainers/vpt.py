"""VPT (Jia et al., ECCV 2022) as trained by muzairkhattak/multimodal-prompt-learning ``trainers/vpt.py``.

Layout: ``trainer.model = CustomCLIP`` whose image encoder holds the learnable prompt tokens
``image_encoder.VPT`` ``(N_CTX_VISION, width)`` (appended after the patch tokens) and, for
``PROMPT_DEPTH_VISION = d > 1``, ``image_encoder.transformer.resblocks.{1..d-1}.VPT_shallow``
``(N_CTX_VISION, width)`` (replacing the previous layer's prompt tokens). Under ``PREC fp16`` these
stay float32 (created after CLIP's fp16 conversion). The text side is a fixed hand-crafted
"a photo of a {class}." feature matrix. The *whole* model is registered
(``register_model("prompt_learner", self.model, ...)``) and its optimiser holds every parameter, so
the adapter selects by name *and* ``requires_grad``; the trainer steps with a bare ``optim.step()``
(fp16/fp32) or ``scaler.step`` (amp), both caught by the step pre-hook.

No zero-shot teacher is kept (the image encoder is prompted), so ProGrad needs ``teacher=``.
Init aliases map the standalone ``PromptedCLIP``'s ``vpt.0`` / ``vpt.i`` onto these names.
"""

from __future__ import annotations

import re

import torch

from ..base import DasslAdapter, register_adapter

VISUAL_PROMPTS = r"^image_encoder\.(VPT$|transformer\.resblocks\.\d+\.VPT_shallow$)"
TEXT_DEEP_PROMPTS = r"^text_encoder\.transformer\.resblocks\.\d+\.VPT_shallow$"


def layer_aliases(names, prefix: str, first: str, deep_rx: str) -> dict:
    """``{f"{prefix}.0": first, f"{prefix}.i": <block i's VPT_shallow>}`` for the names present."""
    out = {}
    for n in names:
        if n == first:
            out[f"{prefix}.0"] = n
        else:
            m = re.match(deep_rx, n)
            if m:
                out[f"{prefix}.{int(m.group(1))}"] = n
    return out


@register_adapter("VPT")
class VPTAdapter(DasslAdapter):
    """VPT: per-layer visual prompt tokens; fixed hand-crafted text features as class state."""

    family = "VPT"
    forward_output = "logits"  # model(images) (training=False); its forward_backward asks for the loss
    prompt_pattern = VISUAL_PROMPTS
    cfg_node = "VPT"

    @property
    def init_aliases(self):
        names = [n for n, _ in self.model.named_parameters()]
        return layer_aliases(names, "vpt", "image_encoder.VPT", r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")

    # the text side: fixed "a photo of a {class}." features, the one class-dependent state
    def class_buffers(self) -> dict:
        return {"fixed_embeddings": self.model.embeddings.fixed_embeddings}

    @torch.no_grad()
    def build_class_buffers(self, classnames, clip_model, tokenize) -> dict:
        names = [c.replace("_", " ") for c in classnames]
        device = next(self.model.parameters()).device
        return {"fixed_embeddings": clip_model.encode_text(tokenize(["a photo of a " + n + "." for n in names])).to(device)}

    def use_class_buffers(self, state: dict) -> None:
        self.model.embeddings.fixed_embeddings = state["fixed_embeddings"]
