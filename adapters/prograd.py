"""ProGrad through any adapter: wrap ``trainer.forward_backward`` to supply G_g.

ProGrad (Zhu et al., ICCV 2023) needs, besides the task gradient G_d that the trainer computes, the
general-knowledge gradient G_g = d KL(p_zero-shot || p_prompted) / d prompts of the same batch.
It is put in every installed hook's ``context["general_grads"]`` before the trainer's
``optim.step()`` (in whatever precision path) fires the step pre-hook, where
:func:`gram_plugin.transforms.prograd` projects G_d per tensor (guarded against ``None`` and zero
G_g) before the regulator sees it. The context is cleared after the step, so a stale G_g can never
be used for another batch. ``torch.autograd.grad`` is used throughout, so no ``.grad`` is touched.

Two ways to get G_g, chosen by the adapter:

* **From the trainer's own forward** (``adapter.logits_from_own_forward``, CoOp): a forward hook on
  ``trainer.model`` takes the logits of the forward that ``forward_backward`` runs anyway and
  differentiates the KL with ``retain_graph=True``; the trainer's ``loss.backward()`` then reuses the
  graph. The teacher reuses that forward's frozen image features when the adapter names the module
  that makes them (:meth:`DasslAdapter.image_features_module`). Cost: one extra backward through the
  text encoder, no extra forward (benchmarks/README.md, ProGrad row).
* **A second forward** (every other adapter, e.g. models that return the loss while training): the
  wrapper computes the prompted and zero-shot logits of the batch itself before calling the
  trainer's ``forward_backward`` unchanged.

Both give the same G_g (tests/test_adapters_coop.py checks the prompts end equal).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from .base import AdapterError, DasslAdapter


def general_knowledge_gradients(adapter: DasslAdapter, batch, params: "OrderedDict[str, torch.Tensor]") -> dict:
    """{name: d KL(p_zs || p_prompted)/d param} for one training batch (``None`` where unused).

    KL is averaged over the batch (``batchmean``), temperature 1, computed in float32; its gradient
    equals that of ProGrad's published ``kl_loss`` (which differs by the teacher's entropy only).
    """
    images, _ = adapter.parse_batch(batch)
    with torch.no_grad():
        teacher = adapter.zero_shot_logits(images)
    with torch.enable_grad():
        return _kl_gradients(adapter.prompted_logits(images), teacher, params, retain_graph=False)


def _kl_gradients(student: torch.Tensor, teacher: torch.Tensor, params, retain_graph: bool) -> dict:
    """{name: d KL(softmax(teacher) || softmax(student)) / d param}, KL in float32 (``batchmean``)."""
    kl = F.kl_div(F.log_softmax(student.float(), dim=-1), F.log_softmax(teacher.float(), dim=-1),
                  reduction="batchmean", log_target=True)
    names = list(params)
    grads = torch.autograd.grad(kl, [params[n] for n in names], retain_graph=retain_graph, allow_unused=True)
    return {n: (None if g is None else g.detach()) for n, g in zip(names, grads)}


def _own_forward_hooks(trainer, adapter: DasslAdapter, hooks: list, params, state: dict) -> list:
    """Forward hooks that compute G_g from the first grad-enabled forward while ``state['armed']``."""
    # A user-given teacher (wrap(..., teacher=...)) is an instance attribute: it must be used as is.
    reuse = "zero_shot_logits" not in adapter.__dict__
    feature_module = adapter.image_features_module() if reuse else None
    handles = []

    if feature_module is not None:
        def keep_features(module, inputs, output):
            if state["armed"]:
                state["features"] = output

        handles.append(feature_module.register_forward_hook(keep_features))

    def general_from_forward(module, inputs, output):
        if not (state["armed"] and torch.is_grad_enabled()):
            return
        state["armed"] = False  # only the trainer's first forward of the step
        images = inputs[0] if inputs else None
        features = state.pop("features", None)
        with torch.no_grad():
            teacher = (adapter.zero_shot_logits_from_features(features) if features is not None
                       else adapter.zero_shot_logits(images))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            general = _kl_gradients(output, teacher, params, retain_graph=True)
        else:  # a fork whose model returns something else: the adapter's prompted_logits may know
            student = adapter.prompted_logits(images)
            if not isinstance(student, torch.Tensor):
                raise AdapterError(
                    f"ProGrad: {type(trainer).__name__}.model(images) returned {type(output).__name__}, not the "
                    f"logits; override {type(adapter).__name__}.prompted_logits, or set logits_from_own_forward "
                    "= False on the adapter"
                )
            general = _kl_gradients(student, teacher, params, retain_graph=False)
        for h in hooks:
            h.context["general_grads"] = general

    # On trainer.model itself (DataParallel included): its output is the gathered batch's logits.
    handles.append(trainer.model.register_forward_hook(general_from_forward))
    return handles


def wrap_forward_backward(trainer, adapter: DasslAdapter, hooks: list, params) -> None:
    """Replace ``trainer.forward_backward`` (instance attribute) by the ProGrad-supplying version."""
    original = trainer.forward_backward
    own_forward = adapter.logits_from_own_forward
    state = {"armed": False}
    handles = _own_forward_hooks(trainer, adapter, hooks, params, state) if own_forward else []

    def forward_backward(batch, *args, **kwargs):
        if own_forward:  # the forward hooks fill context["general_grads"] during the trainer's forward
            state.update(armed=True, features=None)
        else:
            general = general_knowledge_gradients(adapter, batch, params)
            for h in hooks:
                h.context["general_grads"] = general
        try:
            return original(batch, *args, **kwargs)
        finally:
            state.update(armed=False, features=None)
            for h in hooks:
                h.context.pop("general_grads", None)

    forward_backward.__wrapped__ = original
    forward_backward._gram_handles = handles
    trainer.forward_backward = forward_backward
