"""CoCoOp (Zhou et al., CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``).

Layout: ``prompt_learner.ctx`` ``(n_ctx, ctx_dim)`` plus the Meta-Net ``prompt_learner.meta_net.linear{1,2}.{weight,bias}``
(``vis_dim -> vis_dim // 16 -> ctx_dim``; half precision under ``PREC fp16``). Config node
``TRAINER.COCOOP``. Its ``forward_backward`` calls ``optim.zero_grad(); loss.backward(); optim.step()``
(or ``scaler.step``) directly, and the model returns the *loss* while ``prompt_learner.training`` is
set, so the logits are taken with that one flag cleared (``forward_output``) and ProGrad runs a
second forward for G_g.

Zero-shot teacher: as for CoOp, the hand-crafted ``CTX_INIT`` context without the Meta-Net shift.
"""

from __future__ import annotations

from ..base import register_adapter
from .coop import CoOpAdapter


@register_adapter("CoCoOp")
class CoCoOpAdapter(CoOpAdapter):
    """CoCoOp: ``ctx`` and the Meta-Net; its forward returns the loss while training."""

    family = "CoCoOp"
    forward_output = "loss_while_training"
    logits_from_own_forward = False
    prompt_pattern = r"^prompt_learner\.(ctx$|meta_net\.)"
    cfg_node = "COCOOP"
