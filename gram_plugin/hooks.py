"""Install a gradient transform on an existing optimiser, whatever calls its ``step``.

Dassl trainers step their optimisers in three ways: ``model_backward_and_update`` (CoOp fp32),
``optim.zero_grad(); loss.backward(); optim.step()`` (CoCoOp, VPT, MaPLe, PromptSRC) and
``scaler.step(optim)`` (amp). ``Optimizer.register_step_pre_hook`` catches all three. Under amp the
``GradScaler`` unscales the gradients before it calls ``step`` and does not call it at all when it
found inf/NaN, so the transform only ever sees unscaled, finite-step gradients and a skipped step
stays skipped.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .transforms import GradientTransform


class GradientHook:
    """Handle of an installed transform. ``context`` is passed to the transform at every step
    (the ProGrad wrapper stores the general-knowledge gradients there); ``remove()`` uninstalls."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], transform: GradientTransform):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.params = {n: p for n, p in params.items() if id(p) in owned}
        if not self.params:
            raise ValueError("none of the given parameters is optimised by this optimiser")
        self.transform = transform
        self.context: dict = {}
        self.steps = 0
        self._handle = optimizer.register_step_pre_hook(self._pre_step)

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs):
        grads = {n: p.grad for n, p in self.params.items()}
        new = self.transform(grads, self.context)
        for n, p in self.params.items():
            g = new.get(n)
            if g is None or g is p.grad:
                continue
            p.grad.copy_(g.to(dtype=p.grad.dtype, device=p.grad.device))
        self.steps += 1
        return None

    def remove(self) -> None:
        self._handle.remove()


def install_gradient_transform(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    transform: GradientTransform,
) -> GradientHook:
    """Apply ``transform`` to ``{name: param.grad}`` right before every ``optimizer.step()``.

    Only the named parameters that the optimiser owns are transformed; the rest of its parameters
    are left alone. The regulator runs without autograd here (fine-tuning does not train it).
    """
    return GradientHook(optimizer, params, transform)
