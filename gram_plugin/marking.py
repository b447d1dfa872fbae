"""Which parameters of any ``nn.Module`` are prompts (marking them), and calling the module with other prompt tensors.

A prompt parameter is marked by an attribute on the ``nn.Parameter`` itself, so the mark survives
wrapping (DataParallel, a trainer holding the module under another name). Names are always reported
without DataParallel's ``module.`` prefixes, so an artefact saved from a wrapped model loads into an
unwrapped one and back. :func:`module_loss` turns a loss of the module into ``loss_fn(params, batch)``
with the prompts replaced by ``params`` (what the meta-learner differentiates). Imports no other
module of the package.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

_MARK = "_gram_prompt"
LossFn = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]


def strip_wrapper_prefix(name: str) -> str:
    """``module.prompt_learner.ctx`` -> ``prompt_learner.ctx`` (DataParallel / DDP wrapping)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def mark_prompts(
    module: nn.Module,
    names: Iterable[str] | None = None,
    pattern: str | None = None,
    params: Iterable[nn.Parameter] | None = None,
    require_grad: bool = True,
) -> list[str]:
    """Mark prompt parameters of ``module`` and return the (prefix-free) names now marked.

    Select by exact ``names``, by a regular expression ``pattern`` (``re.search`` on the name), or
    by passing the ``params`` themselves. With ``require_grad`` only parameters that require
    gradients are taken by a pattern (a frozen copy of a prompt, e.g. PromptSRC's zero-shot
    encoder, is never picked up by accident). Asking for a name that does not exist is an error.
    """
    if names is None and pattern is None and params is None:
        raise ValueError("mark_prompts needs names=, pattern= or params=")
    named = OrderedDict((strip_wrapper_prefix(n), p) for n, p in module.named_parameters())
    chosen: list[nn.Parameter] = []
    if names is not None:
        names = list(names)
        missing = [n for n in names if strip_wrapper_prefix(n) not in named]
        if missing:
            raise KeyError(
                f"mark_prompts: no parameter named {missing} in {type(module).__name__}; "
                f"available: {list(named)[:20]}{' ...' if len(named) > 20 else ''}"
            )
        chosen += [named[strip_wrapper_prefix(n)] for n in names]
    if pattern is not None:
        rx = re.compile(pattern)
        hits = [p for n, p in named.items() if rx.search(n) and (p.requires_grad or not require_grad)]
        if not hits:
            raise KeyError(f"mark_prompts: pattern {pattern!r} matches no trainable parameter")
        chosen += hits
    if params is not None:
        ids = {id(p) for p in named.values()}
        for p in params:
            if id(p) not in ids:
                raise KeyError("mark_prompts: a parameter passed in params= is not owned by the module")
            chosen.append(p)
    for p in chosen:
        setattr(p, _MARK, True)
    return [n for n, p in named.items() if getattr(p, _MARK, False)]


def unmark_prompts(module: nn.Module) -> None:
    """Remove every prompt mark from ``module``'s parameters."""
    for p in module.parameters():
        if hasattr(p, _MARK):
            delattr(p, _MARK)


def is_prompt(param: torch.Tensor) -> bool:
    """Whether ``param`` carries the prompt mark."""
    return bool(getattr(param, _MARK, False))


def prompt_parameters(module: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """The marked prompt parameters in registration order, names without ``module.`` prefixes."""
    out: "OrderedDict[str, nn.Parameter]" = OrderedDict()
    seen: set[int] = set()
    for n, p in module.named_parameters():
        if is_prompt(p) and id(p) not in seen:
            seen.add(id(p))
            out[strip_wrapper_prefix(n)] = p
    if not out:
        raise ValueError(
            f"{type(module).__name__} has no marked prompt parameters: call "
            "gram_plugin.mark_prompts(module, names=[...] or pattern=...) first"
        )
    return out


def module_loss(module: nn.Module, loss_on_batch: Callable[[nn.Module, Any], torch.Tensor]) -> LossFn:
    """Turn ``loss_on_batch(module, batch)`` into ``loss_fn(params, batch)``.

    The module's marked prompt parameters are replaced by ``params`` for the duration of the call
    (``torch.func.functional_call``), so fast weights of the inner loop flow through the module's
    own forward code, whatever it is.
    """
    real_names = {strip_wrapper_prefix(n): n for n, _ in module.named_parameters()}

    class _Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, batch):
            return loss_on_batch(self.inner, batch)

    wrapper = _Call()

    def loss_fn(params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        mapped = {"inner." + real_names[n]: t for n, t in params.items()}
        return torch.func.functional_call(wrapper, mapped, (batch,), strict=False, tie_weights=False)

    loss_fn.module = module  # the model it runs (gram_plugin.metabatch sizes its memory budget by it)
    return loss_fn
