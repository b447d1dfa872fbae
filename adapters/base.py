"""Adapter base class and registry: what the plug-in needs to know about one Dassl trainer.

An adapter answers three questions about a built trainer (``trainer = build_trainer(cfg)``):

1. **Which parameters are the prompts?** :meth:`DasslAdapter.prompt_parameters` returns
   ``{name: param}`` for the parameters of ``trainer.model`` that require gradients and match
   :attr:`DasslAdapter.prompt_pattern`. Names are relative to ``trainer.model`` with DataParallel's
   ``module.`` prefix stripped (``prompt_learner.ctx``), so an init saved on one GPU layout loads on
   another. Select by ``requires_grad`` as well as by name: PromptSRC keeps a frozen zero-shot
   encoder inside ``prompt_learner``.
2. **Which optimisers step them?** :meth:`DasslAdapter.optimizers` returns every optimiser registered
   through ``register_model`` (``trainer._optims``). The regulated step is installed on each with
   ``Optimizer.register_step_pre_hook`` (see :mod:`gram_plugin.hooks`), the one hook that catches
   ``model_backward_and_update``, a bare ``optim.step()`` and ``scaler.step(optim)`` (after unscaling).
3. **For ProGrad: what are the prompted and the zero-shot logits of a training batch?**
   :meth:`prompted_logits` and :meth:`zero_shot_logits`. The ProGrad wrapper
   (:mod:`gram_plugin.adapters.prograd`) calls them inside the trainer's ``forward_backward`` to get
   the general-knowledge gradient. An adapter without a zero-shot teacher leaves
   :meth:`zero_shot_logits` raising ``NotImplementedError`` and ProGrad is refused for it.

Writing an adapter for another trainer (VPT, MaPLe, PromptSRC, ...)::

    @register_adapter("MaPLe")
    class MaPLeAdapter(DasslAdapter):
        prompt_pattern = r"^prompt_learner\\."
        def prompted_logits(self, images): ...      # only if ProGrad is wanted
        def zero_shot_logits(self, images): ...

Registration is by trainer class name; :func:`adapter_for` walks the trainer's class hierarchy, so a
fork's ``class MyCoOp(CoOp)`` gets the CoOp adapter.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from gram_plugin.prompts import strip_wrapper_prefix

_REGISTRY: "OrderedDict[str, type[DasslAdapter]]" = OrderedDict()


class AdapterError(ValueError):
    """The trainer does not fit the adapter (no prompt parameters, no optimiser, no teacher, ...)."""


def unwrap(module: nn.Module) -> nn.Module:
    """``nn.DataParallel`` / DDP -> the module inside."""
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


class DasslAdapter:
    """Base adapter: prompt parameters by name pattern, optimisers from ``register_model``.

    Subclasses set :attr:`prompt_pattern` (a regular expression searched in the prefix-free
    parameter names of ``trainer.model``) and, for ProGrad, override :meth:`prompted_logits` and
    :meth:`zero_shot_logits`. :meth:`prepare` runs once in ``wrap`` before the init is swapped in
    (capture anything that the init would overwrite, e.g. a hand-crafted context for a teacher).
    """

    #: regular expression (``re.search``) selecting prompt parameters among trainable ones
    prompt_pattern: str = r"^prompt_learner\."
    #: the trainer already projects gradients itself (ProGrad's own trainer): refuse a second ProGrad
    projects_itself: bool = False
    #: init tensor names accepted as aliases, e.g. ``{"ctx": "prompt_learner.ctx"}``
    init_aliases: dict = {}
    #: ``trainer.model(images)`` returns the prompted logits while training (not the loss), so ProGrad
    #: takes G_g from the trainer's own forward instead of running a second one
    logits_from_own_forward: bool = False

    def __init__(self, trainer):
        if not hasattr(trainer, "model") or not isinstance(getattr(trainer, "model"), nn.Module):
            raise AdapterError(f"{type(trainer).__name__} has no nn.Module `model`: build it with build_trainer(cfg) first")
        self.trainer = trainer

    # -- 1. parameters -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return unwrap(self.trainer.model)

    def prompt_parameters(self) -> "OrderedDict[str, nn.Parameter]":
        rx = re.compile(self.prompt_pattern)
        out: "OrderedDict[str, nn.Parameter]" = OrderedDict()
        seen: set[int] = set()
        for name, p in self.model.named_parameters():
            name = strip_wrapper_prefix(name)
            if p.requires_grad and rx.search(name) and id(p) not in seen:
                seen.add(id(p))
                out[name] = p
        if not out:
            raise AdapterError(
                f"{type(self).__name__}: no trainable parameter of {type(self.trainer).__name__}.model "
                f"matches {self.prompt_pattern!r}"
            )
        return out

    # -- 2. optimisers -------------------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        optims = getattr(self.trainer, "_optims", None) or {}
        out, seen = [], set()
        for opt in list(optims.values()) + [getattr(self.trainer, "optim", None)]:
            if isinstance(opt, torch.optim.Optimizer) and id(opt) not in seen:
                seen.add(id(opt))
                out.append(opt)
        if not out:
            raise AdapterError(f"{type(self.trainer).__name__} registered no optimiser (register_model(name, model, optim, sched))")
        return out

    # -- 3. logits for ProGrad -----------------------------------------------------------------
    def parse_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of a training batch, on the trainer's device."""
        parsed = self.trainer.parse_batch_train(batch)
        return parsed[0], parsed[1]

    def prompted_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the prompted model, differentiable in the prompt parameters."""
        return self.trainer.model(images)

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no zero-shot teacher")

    def image_features_module(self) -> Optional[nn.Module]:
        """The frozen module whose output in the trainer's forward the teacher can reuse (or ``None``)."""
        return None

    def zero_shot_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits from the output of :meth:`image_features_module`."""
        raise NotImplementedError(f"{type(self).__name__} does not reuse image features")

    def teacher_problem(self) -> Optional[str]:
        """Why ProGrad cannot run on this trainer (``None`` when a zero-shot teacher exists)."""
        if "zero_shot_logits" in self.__dict__ or type(self).zero_shot_logits is not DasslAdapter.zero_shot_logits:
            return None
        return f"{type(self).__name__} has no zero-shot teacher: pass wrap(..., teacher=<images -> logits>)"

    def prepare(self) -> None:
        """Called by ``wrap`` before the init is swapped in."""

    def describe(self) -> dict:
        return {n: tuple(p.shape) for n, p in self.prompt_parameters().items()}


class GenericAdapter(DasslAdapter):
    """Any trainer: prompt parameters given by exact ``names`` or a regular expression ``pattern``.

    ``teacher``: optional ``images -> zero-shot logits`` callable, enabling ProGrad.
    ``logits``: optional ``images -> prompted logits`` callable (default ``trainer.model(images)``).
    """

    def __init__(
        self,
        trainer,
        names: Optional[Iterable[str]] = None,
        pattern: Optional[str] = None,
        teacher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        super().__init__(trainer)
        if names is None and pattern is None:
            raise AdapterError("GenericAdapter needs names=[...] or pattern=... of the prompt parameters")
        self.names = None if names is None else [strip_wrapper_prefix(n) for n in names]
        if pattern is not None:
            self.prompt_pattern = pattern
        self._teacher, self._logits = teacher, logits

    def prompt_parameters(self):
        if self.names is None:
            return super().prompt_parameters()
        named = {strip_wrapper_prefix(n): p for n, p in self.model.named_parameters()}
        missing = [n for n in self.names if n not in named]
        if missing:
            raise AdapterError(f"no parameter named {missing} in {type(self.trainer).__name__}.model; available: {list(named)[:20]}")
        frozen = [n for n in self.names if not named[n].requires_grad]
        if frozen:
            raise AdapterError(f"prompt parameters {frozen} do not require gradients (frozen): they would never be trained")
        return OrderedDict((n, named[n]) for n in self.names)

    def prompted_logits(self, images):
        return self._logits(images) if self._logits is not None else super().prompted_logits(images)

    def teacher_problem(self):
        if self._teacher is None and "zero_shot_logits" not in self.__dict__:
            return "GenericAdapter has no zero-shot teacher: pass wrap(..., teacher=<images -> logits>)"
        return None

    def zero_shot_logits(self, images):
        if self._teacher is None:
            raise NotImplementedError("GenericAdapter: pass teacher=<images -> zero-shot logits> to use ProGrad")
        return self._teacher(images)


def register_adapter(*trainer_names: str):
    """Class decorator: use this adapter for Dassl trainers of these class names (and subclasses)."""
    if not trainer_names:
        raise ValueError("register_adapter needs at least one trainer class name")

    def deco(cls):
        for name in trainer_names:
            _REGISTRY[name] = cls
        return cls

    return deco


def supported_trainers() -> list[str]:
    return list(_REGISTRY)


def adapter_for(trainer) -> DasslAdapter:
    """The registered adapter for ``trainer`` (looked up by class name along its MRO)."""
    for klass in type(trainer).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__](trainer)
    raise AdapterError(
        f"no gram-plugin adapter for trainer {type(trainer).__name__!r}; supported: "
        f"{', '.join(supported_trainers())}. For another trainer pass its prompt parameters: "
        "wrap(trainer, params=['prompt_learner.ctx']) or wrap(trainer, pattern=r'^prompt_learner\\.')"
    )
