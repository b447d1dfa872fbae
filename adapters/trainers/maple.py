"""MaPLe (Khattak et al., CVPR 2023; muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``).

Layout (``N = TRAINER.MAPLE.N_CTX``, ``D`` text width, ``W`` vision width, ``d = PROMPT_DEPTH``):
``prompt_learner.ctx`` ``(N, D)`` (CLIP dtype), ``prompt_learner.proj`` Linear(D -> W) (coupling the
text context to the shallow visual prompts; fp16 upstream), ``prompt_learner.compound_prompts_text.{0..d-2}``
``(N, D)`` and ``prompt_learner.compound_prompt_projections.{0..d-2}`` Linear(D -> W) (float32 even
under ``PREC fp16``). All of them are meta-learned and regulated: the regulator's heads act on the
last dimension, so each projection's weight ``(W, D)`` is regulated row-wise with a width-D head.
The whole model is registered (``register_model("MultiModalPromptLearner", self.model, ...)``);
the trainer steps with a bare ``optim.step()`` or ``scaler.step``.

Upstream's prompt learner calls ``self.proj.half()`` whatever ``PREC`` says, so a trainer built under
``PREC fp32`` (as meta-training forces) holds an fp16 ``proj`` in a float32 model: meta-training casts
it to float32 first (:meth:`MaPLeAdapter.prepare_meta_training`).

No zero-shot teacher (with ``CTX_INIT`` and ``N < len(words)`` the context is only the first N
words), so ProGrad needs ``teacher=``.
"""

from __future__ import annotations

import torch

from ..base import DasslAdapter, register_adapter


@register_adapter("MaPLe")
class MaPLeAdapter(DasslAdapter):
    """MaPLe: ``ctx``, its coupling ``proj``, compound prompts and their projections."""

    family = "MaPLe"
    forward_output = "loss_while_training"
    prompt_pattern = r"^prompt_learner\.(ctx$|proj\.|compound_prompts_text\.\d+$|compound_prompt_projections\.\d+\.)"
    init_aliases = {"ctx": "prompt_learner.ctx"}
    cfg_node = "MAPLE"
    ctx_init_max_tokens = 4
    clip_widths = (512, 768)  # its prompt learner hard-codes these (text, vision) widths

    def prepare_meta_training(self) -> None:
        """Cast upstream's fp16 ``proj`` to float32 when the rest of the model is float32 (``PREC fp32``)."""
        proj = self.model.prompt_learner.proj
        if getattr(self.model, "dtype", None) == torch.float32 and proj.weight.dtype != torch.float32:
            proj.float()  # in place: the optimiser's parameter objects stay the same
