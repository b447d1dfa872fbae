"""Install a gradient transform on an existing optimiser, whatever calls its ``step``.

Dassl trainers step their optimisers in three ways: ``model_backward_and_update`` (CoOp fp32),
``optim.zero_grad(); loss.backward(); optim.step()`` (CoCoOp, VPT, MaPLe, PromptSRC) and
``scaler.step(optim)`` (amp). ``Optimizer.register_step_pre_hook`` catches all three. Under amp the
``GradScaler`` unscales the gradients before it calls ``step`` and does not call it at all when it
found inf/NaN, so the transform only ever sees unscaled, finite-step gradients and a skipped step
stays skipped.

A transform that needs more than the gradients (ProGrad's ``general_grads``) gets them as keyword
arguments from a :class:`StepArguments`: whoever computes them for a step sets them there, the
hook passes them to the transform at that step, and they are cleared after it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .transforms import GradientTransform


_INSTALLED = "_gram_hooked_params"  # optimiser attribute: id(param) -> the GradientHook transforming it


class StepArguments:
    """Keyword arguments for the transform at the coming optimiser step(s) of one training step.

    ``set(general_grads=...)`` after computing them for the current batch; every hook sharing this
    object passes them to its transform when its optimiser steps; ``clear()`` once the training
    step is over, so a value computed for one batch never reaches the step of another.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def set(self, **values: Any) -> None:
        """Set the keyword arguments of the coming step(s)."""
        self._values.update(values)

    def clear(self) -> None:
        """Forget them (the training step is over)."""
        self._values = {}

    @property
    def pending(self) -> dict[str, Any]:
        """What the next step's transform will get (a copy)."""
        return dict(self._values)


class GradientHook:
    """Handle of an installed transform; ``remove()`` uninstalls it. ``steps`` counts the
    optimiser steps it transformed; ``arguments`` (a :class:`StepArguments`, or ``None``) supplies
    the transform's keyword arguments."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], transform: GradientTransform,
                 arguments: Optional[StepArguments] = None):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.params = {n: p for n, p in params.items() if id(p) in owned}
        if not self.params:
            raise ValueError("none of the given parameters is optimised by this optimiser")
        # a second hook on the same parameters would apply its transform on top of the first (a regulator twice)
        installed = optimizer.__dict__.setdefault(_INSTALLED, {})
        taken = [n for n, p in self.params.items() if id(p) in installed]
        if taken:
            raise ValueError(f"a gradient transform is already installed on this optimiser for {taken}: remove() "
                             "that hook first, or chain(...) the transforms into one")
        self.transform = transform
        self.arguments = arguments
        self.steps = 0
        self._optimizer = optimizer
        self._handle = optimizer.register_step_pre_hook(self._pre_step)
        installed.update((id(p), self) for p in self.params.values())

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs):
        grads = {n: p.grad for n, p in self.params.items()}
        extra = self.arguments.pending if self.arguments is not None else {}
        new = self.transform(grads, **extra)
        for n, p in self.params.items():
            g = new.get(n)
            if g is None or g is p.grad:
                continue
            p.grad.copy_(g.to(dtype=p.grad.dtype, device=p.grad.device))
        self.steps += 1
        return None

    def remove(self) -> None:
        """Uninstall the transform from the optimiser."""
        self._handle.remove()
        installed = self._optimizer.__dict__.get(_INSTALLED, {})
        for p in self.params.values():
            if installed.get(id(p)) is self:
                del installed[id(p)]


def install_gradient_transform(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    transform: GradientTransform,
    arguments: Optional[StepArguments] = None,
) -> GradientHook:
    """Apply ``transform`` to ``{name: param.grad}`` right before every ``optimizer.step()``.

    Only the named parameters that the optimiser owns are transformed; the rest of its parameters
    are left alone. The regulator runs without autograd here (fine-tuning does not train it).
    ``arguments``: where the transform's keyword arguments for each step come from (ProGrad's
    ``general_grads``). Raises ``ValueError`` when the optimiser owns none of ``params``.
    Raises ``ValueError`` too if a hook installed here already transforms one of these parameters
    (remove it first, or chain the transforms).
    """
    return GradientHook(optimizer, params, transform, arguments)
