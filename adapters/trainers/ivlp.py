"""IVLP, independent vision-language prompting (Khattak et al., ICCV 2023; muzairkhattak/PromptSRC
``trainers/independentVL.py``, and multimodal-prompt-learning's).

Layout (``N_t = N_CTX_TEXT``, ``N_v = N_CTX_VISION``): ``prompt_learner.ctx`` ``(N_t, D)``,
``image_encoder.VPT`` ``(N_v, W)``, ``image_encoder.transformer.resblocks.i.VPT_shallow`` ``(N_v, W)``
and ``text_encoder.transformer.resblocks.i.VPT_shallow`` ``(N_t, D)`` for i in 1..depth-1. VPT tokens
are float32 under ``PREC fp16``, ``ctx`` takes CLIP's dtype. Joint text + visual prompts regulated by
one ``GradientRegulator`` is UNIGRAM's setting. The model returns the loss while
``prompt_learner.training`` is set. No zero-shot teacher is kept, so ProGrad needs ``teacher=``.
"""

from __future__ import annotations

from ..base import DasslAdapter, register_adapter
from .vpt import TEXT_DEEP_PROMPTS, VISUAL_PROMPTS, layer_aliases

IVLP_PROMPTS = r"^prompt_learner\.ctx$|" + VISUAL_PROMPTS + "|" + TEXT_DEEP_PROMPTS


@register_adapter("IVLP")
class IVLPAdapter(DasslAdapter):
    """IVLP: text ``ctx`` plus visual and text prompt tokens per block (UNIGRAM with a regulator)."""

    family = "IVLP"
    forward_output = "loss_while_training"
    prompt_pattern = IVLP_PROMPTS
    cfg_node = "IVLP"
    regulated_name = "UNIGRAM"  # joint text + visual prompts under one regulator
    ctx_init_max_tokens = 4

    @property
    def init_aliases(self):
        names = [n for n, _ in self.model.named_parameters()]
        aliases = {"ctx": "prompt_learner.ctx"}
        aliases.update(layer_aliases(names, "vpt", "image_encoder.VPT", r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$"))
        return aliases
