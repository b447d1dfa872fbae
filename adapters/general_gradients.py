"""ProGrad on a Dassl trainer: supply G_g to the regulated step, as an explicit argument.

ProGrad (Zhu et al., ICCV 2023) needs, besides the task gradient G_d that the trainer computes, the
general-knowledge gradient G_g = d KL(p_zero-shot || p_prompted) / d prompts of the same batch
(:func:`gram_plugin.transforms.general_knowledge_gradients`, the one KL-gradient function, also
used by the standalone ``finetune.tune``). :class:`GeneralGradients` computes it during the
trainer's ``forward_backward`` and sets it in a :class:`~gram_plugin.hooks.StepArguments`; the step
pre-hooks pass it to the transform as ``general_grads=`` when the trainer's ``optim.step()`` fires
(in whatever precision path), where :func:`gram_plugin.transforms.prograd` projects G_d per tensor
before the regulator sees it. It is cleared when ``forward_backward`` returns, so a G_g can never
reach the step of another batch. ``torch.autograd.grad`` is used throughout: no ``.grad`` is touched.

Two ways to get G_g, chosen by the adapter's ``logits_from_own_forward``:

* **From the trainer's own forward** (CoOp): a forward hook on ``trainer.model`` takes the logits
  of the forward that ``forward_backward`` runs anyway and differentiates the KL with
  ``retain_graph=True``; the trainer's ``loss.backward()`` then reuses the graph. The teacher reuses
  that forward's frozen image features when it names the module that makes them
  (:meth:`ZeroShotTeacher.features_module`). Cost: one extra backward through the text encoder, no
  extra forward (benchmarks/README.md, ProGrad row).
* **A second forward** (every other adapter, e.g. models that return the loss while training):
  the prompted and zero-shot logits of the batch are computed before the trainer's
  ``forward_backward`` runs unchanged.

Both give the same G_g (tests/test_adapters_coop.py checks the prompts end equal).
"""

from __future__ import annotations

from typing import Mapping

import torch

from gram_plugin.hooks import StepArguments
from gram_plugin.transforms import general_knowledge_gradients

from .base import AdapterError, DasslAdapter, ZeroShotTeacher


class GeneralGradients:
    """Computes ProGrad's G_g for each training step of ``trainer`` and hands it to the step.

    Args:
        trainer: the Dassl trainer (its ``forward_backward`` is wrapped by :meth:`install`).
        adapter: its adapter (batch parsing, prompted logits, ``logits_from_own_forward``).
        teacher: the zero-shot teacher (:class:`ZeroShotTeacher`), already prepared.
        params: ``{name: parameter}`` of the prompts.
    """

    def __init__(self, trainer, adapter: DasslAdapter, teacher: ZeroShotTeacher, params: Mapping[str, torch.Tensor]):
        self.trainer, self.adapter, self.teacher, self.params = trainer, adapter, teacher, params
        self.arguments = StepArguments()  # what the step pre-hooks pass to the transform
        self.own_forward = bool(adapter.logits_from_own_forward)
        self._armed = False
        self._features = None
        self._handles: list = []
        self._original = None

    def for_batch(self, batch) -> dict:
        """G_g of one training batch by a second forward (``None`` where a prompt is unused)."""
        images, _ = self.adapter.parse_batch(batch)
        with torch.no_grad():
            teacher = self.teacher.logits(images)
        with torch.enable_grad():
            return general_knowledge_gradients(self.adapter.prompted_logits(images), teacher, self.params)

    # -- the trainer's own forward -----------------------------------------------------------------
    def _keep_features(self, module, inputs, output):
        if self._armed:
            self._features = output

    def _from_forward(self, module, inputs, output):
        if not (self._armed and torch.is_grad_enabled()):
            return
        self._armed = False  # only the trainer's first forward of the step
        images = inputs[0] if inputs else None
        features, self._features = self._features, None
        with torch.no_grad():
            teacher = self.teacher.logits_from_features(features) if features is not None else self.teacher.logits(images)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            general = general_knowledge_gradients(output, teacher, self.params, retain_graph=True)
        else:  # a fork whose model returns something else: the adapter's prompted_logits may know
            student = self.adapter.prompted_logits(images)
            if not isinstance(student, torch.Tensor):
                raise AdapterError(
                    f"ProGrad: {type(self.trainer).__name__}.model(images) returned {type(output).__name__}, not the "
                    f"logits; state forward_output on {type(self.adapter).__name__}, or set logits_from_own_forward = False"
                )
            general = general_knowledge_gradients(student, teacher, self.params)
        self.arguments.set(general_grads=general)

    # -- installing ------------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap ``trainer.forward_backward`` (an instance attribute) and, for the own-forward way,
        hook ``trainer.model`` (DataParallel included: its output is the gathered batch's logits)."""
        if self.own_forward:
            module = self.teacher.features_module()
            if module is not None:
                self._handles.append(module.register_forward_hook(self._keep_features))
            self._handles.append(self.trainer.model.register_forward_hook(self._from_forward))
        self._original = self.trainer.forward_backward

        def forward_backward(batch, *args, **kwargs):
            if self.own_forward:  # the forward hook sets general_grads during the trainer's forward
                self._armed, self._features = True, None
            else:
                self.arguments.set(general_grads=self.for_batch(batch))
            try:
                return self._original(batch, *args, **kwargs)
            finally:
                self._armed, self._features = False, None
                self.arguments.clear()

        forward_backward.__wrapped__ = self._original
        self.trainer.forward_backward = forward_backward

    def remove(self) -> None:
        """Undo :meth:`install`: the trainer's own ``forward_backward`` and no forward hook left."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._original is not None and "forward_backward" in self.trainer.__dict__:
            del self.trainer.forward_backward
        self._original = None
