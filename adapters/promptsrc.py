"""IVLP and PromptSRC (Khattak et al., ICCV 2023; muzairkhattak/PromptSRC ``trainers/promptsrc.py``).

IVLP (independent vision-language prompting) layout (``N_t = N_CTX_TEXT``, ``N_v = N_CTX_VISION``):
``prompt_learner.ctx`` ``(N_t, D)``, ``image_encoder.VPT`` ``(N_v, W)``,
``image_encoder.transformer.resblocks.i.VPT_shallow`` ``(N_v, W)`` and
``text_encoder.transformer.resblocks.i.VPT_shallow`` ``(N_t, D)`` for i in 1..depth-1. VPT tokens are
float32 under ``PREC fp16``, ``ctx`` takes CLIP's dtype. Joint text + visual prompts regulated by one
``GradientRegulator`` is UNIGRAM's setting.

PromptSRC is IVLP plus self-regularisation: a frozen, prompt-free zero-shot image encoder
``prompt_learner.ZS_image_encoder`` *inside* the prompt learner (requires_grad False -- the adapter
selects by ``requires_grad``, so it is never regulated, meta-learned or overwritten by an init),
fixed text embeddings ``prompt_learner.fixed_embeddings`` (mean over templates of the frozen text
features; a plain attribute, not saved), the loss CE + L1 text + L1 image + KL(logits || zero-shot
logits), and Gaussian prompt aggregation (GPA) over epochs. The regulated step acts on the gradient of
that whole loss at ``optim.step()``; GPA then averages the regulated weights (it reads and finally
loads ``model.state_dict()``, which copies into the same parameter objects, so the hooks stay valid).

ProGrad: PromptSRC already holds a zero-shot teacher,
``logit_scale * norm(ZS_image_encoder(x)) @ norm(fixed_embeddings).T`` -- exactly its own
``zero_shot_logits``.
"""

from __future__ import annotations

import torch

from .base import AdapterError, DasslAdapter, register_adapter
from .vpt import TEXT_DEEP_PROMPTS, VISUAL_PROMPTS, _LogitsWhileTraining, layer_aliases

IVLP_PROMPTS = r"^prompt_learner\.ctx$|" + VISUAL_PROMPTS + "|" + TEXT_DEEP_PROMPTS


def encoder_dtype(encoder) -> torch.dtype:
    """The dtype a CLIP image encoder computes in: its patch embedding's (``conv1``), as CLIP's own
    ``dtype`` property reads it (``convert_weights`` leaves embeddings and LayerNorms float32)."""
    conv = getattr(encoder, "conv1", None)
    if conv is not None and getattr(conv, "weight", None) is not None:
        return conv.weight.dtype
    return next(encoder.parameters()).dtype


@register_adapter("IVLP")
class IVLPAdapter(_LogitsWhileTraining, DasslAdapter):
    prompt_pattern = IVLP_PROMPTS

    @property
    def init_aliases(self):
        names = [n for n, _ in self.model.named_parameters()]
        aliases = {"ctx": "prompt_learner.ctx"}
        aliases.update(layer_aliases(names, "vpt", "image_encoder.VPT", r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$"))
        return aliases


@register_adapter("PromptSRC")
class PromptSRCAdapter(IVLPAdapter):
    def prepare(self) -> None:
        pl = self.model.prompt_learner
        if not hasattr(pl, "ZS_image_encoder") or not hasattr(pl, "fixed_embeddings"):
            raise AdapterError("PromptSRC trainer without prompt_learner.ZS_image_encoder / fixed_embeddings")
        trainable = [n for n, p in pl.ZS_image_encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise AdapterError(
                f"PromptSRC's zero-shot image encoder must stay frozen, but {trainable[:3]} require gradients"
            )

    @torch.no_grad()
    def zero_shot_logits(self, images):
        model = self.model
        pl = model.prompt_learner
        # in the encoder's own dtype: upstream keeps it fp16 even when the trainer runs fp32
        f = pl.ZS_image_encoder(images.type(encoder_dtype(pl.ZS_image_encoder))).float()
        f = f / f.norm(dim=-1, keepdim=True)
        t = pl.fixed_embeddings.to(f.device).float()
        t = t / t.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp().float() * f @ t.t()

    def teacher_problem(self):
        return None
