"""ProGrad's own trainer (Zhu et al., ICCV 2023; BeierZhu/Prompt-align ``trainers/prograd.py``).

CoOp's prompt learner under the ``TRAINER.COOP`` node, a frozen zero-shot CLIP in
``trainer.zs_clip``, and a ``prograd_backward_and_update`` that projects the gradients (``LOSS.LAMBDA``)
before ``optim.step()``. The trainer projects by itself, so ``wrap`` refuses a second ProGrad
(``projects_itself``); the regulator (a step pre-hook) then acts on the already projected gradient,
i.e. the order is the same as ``chain(prograd, regulate)``.

(ProGrad *on any trainer* -- the projection installed by ``wrap(trainer, prograd=...)`` -- is
:mod:`gram_plugin.adapters.general_gradients` and :func:`gram_plugin.transforms.prograd`.)
"""

from __future__ import annotations

from ..base import AdapterError, register_adapter
from .coop import CoOpAdapter


@register_adapter("ProGrad")
class ProGradAdapter(CoOpAdapter):
    """ProGrad's own trainer: CoOp's prompts, projects its gradients itself."""

    family = "ProGrad"
    forward_output = "logits"
    projects_itself = True
    teacher = None  # it projects with its own zs_clip: wrap never adds a second ProGrad

    def prepare(self) -> None:
        if not hasattr(self.trainer, "zs_clip"):
            raise AdapterError("ProGrad trainer without `zs_clip`: is this ProGrad's own trainer?")
