"""ProGrad through any adapter: wrap ``trainer.forward_backward`` to supply G_g.

ProGrad (Zhu et al., ICCV 2023) needs, besides the task gradient G_d that the trainer computes, the
general-knowledge gradient G_g = d KL(p_zero-shot || p_prompted) / d prompts of the same batch.
The wrapper computes G_g first (one extra forward of the prompted model, ``torch.autograd.grad``
so no ``.grad`` is touched), puts it in every installed hook's ``context["general_grads"]``, then
runs the trainer's own ``forward_backward`` unchanged. Its ``optim.step()`` (in whatever precision
path) fires the step pre-hook, where :func:`gram_plugin.transforms.prograd` projects G_d per tensor
(guarded against ``None`` and zero G_g) before the regulator sees it. The context is cleared after
the step, so a stale G_g can never be used for another batch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from .base import DasslAdapter


def general_knowledge_gradients(adapter: DasslAdapter, batch, params: "OrderedDict[str, torch.Tensor]") -> dict:
    """{name: d KL(p_zs || p_prompted)/d param} for one training batch (``None`` where unused).

    KL is averaged over the batch (``batchmean``), temperature 1, computed in float32; its gradient
    equals that of ProGrad's published ``kl_loss`` (which differs by the teacher's entropy only).
    """
    images, _ = adapter.parse_batch(batch)
    with torch.no_grad():
        teacher = adapter.zero_shot_logits(images).float()
    with torch.enable_grad():
        student = adapter.prompted_logits(images).float()
        kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True)
        names = list(params)
        grads = torch.autograd.grad(kl, [params[n] for n in names], allow_unused=True)
    return {n: (None if g is None else g.detach()) for n, g in zip(names, grads)}


def wrap_forward_backward(trainer, adapter: DasslAdapter, hooks: list, params) -> None:
    """Replace ``trainer.forward_backward`` (instance attribute) by the ProGrad-supplying version."""
    original = trainer.forward_backward

    def forward_backward(batch, *args, **kwargs):
        general = general_knowledge_gradients(adapter, batch, params)
        for h in hooks:
            h.context["general_grads"] = general
        try:
            return original(batch, *args, **kwargs)
        finally:
            for h in hooks:
                h.context.pop("general_grads", None)

    forward_backward.__wrapped__ = original
    trainer.forward_backward = forward_backward
