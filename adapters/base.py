"""Adapter base class and registry: everything the plug-in needs to know about one Dassl trainer.

One file per trainer subclasses :class:`DasslAdapter` and registers it by trainer class name
(``@register_adapter("CoOp")``); ``import gram_plugin.adapters`` imports every such file, so the
registry is complete after that one import (as ``import peft`` fills PEFT's method registry).
Nothing trainer-specific lives anywhere else. An adapter answers, for a built trainer
(``trainer = build_trainer(cfg)``):

1. **Which parameters are the prompts?** :meth:`DasslAdapter.prompt_parameters` returns
   ``{name: param}`` for the parameters of ``trainer.model`` that require gradients and match
   :attr:`DasslAdapter.prompt_pattern`. Names are relative to ``trainer.model`` with DataParallel's
   ``module.`` prefix stripped (``prompt_learner.ctx``), so an init saved on one GPU layout loads on
   another. Select by ``requires_grad`` as well as by name: PromptSRC keeps a frozen zero-shot
   encoder inside ``prompt_learner``.
2. **Which optimisers step them?** :meth:`optimizers`: every optimiser registered through
   ``register_model`` (``trainer._optims``). The regulated step is installed on each with
   ``Optimizer.register_step_pre_hook`` (:mod:`gram_plugin.hooks`), the one hook that catches
   ``model_backward_and_update``, a bare ``optim.step()`` and ``scaler.step(optim)`` (after unscaling).
3. **How does the trainer compute its logits and its loss?** :meth:`model_logits` (the one place
   that knows a CustomCLIP may return the *loss* while ``prompt_learner.training`` is set),
   :meth:`prompted_logits`, and :meth:`method_loss` (what meta-training differentiates: CE by
   default, PromptSRC's and KgCoOp's own terms in their files). ProGrad also needs
   :meth:`zero_shot_logits`; an adapter without a teacher leaves it raising and ProGrad is refused.
4. **Which state depends on the class names?** For meta-training across class sets
   (:mod:`gram_plugin.adapters.meta`): :meth:`class_buffers` (the trainer's own),
   :meth:`build_class_buffers` (the same for other classes, built the way the trainer's
   ``__init__`` builds them) and :meth:`use_class_buffers`. The default covers a CoOp-style
   ``prompt_learner`` (token prefix / suffix, tokenized prompts); adapters add their extras.
5. **Its config node** :attr:`cfg_node` (``cfg.TRAINER.<cfg_node>``) and the :attr:`family` name used
   in method names (``MP-CoOp``, ``GRAM-VPT``).

Adding a trainer is one new file in ``adapters/`` (and its test)::

    @register_adapter("KgCoOp")
    class KgCoOpAdapter(CoOpAdapter):
        family = "KgCoOp"
        def method_loss(self, model, images, labels): ...

Registration is by trainer class name; :func:`adapter_for` walks the trainer's class hierarchy, so a
fork's ``class MyCoOp(CoOp)`` gets the CoOp adapter.
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
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


def trainer_module(trainer):
    """The Python module that defines the trainer's class (its templates, ``load_clip_to_cpu``)."""
    return sys.modules.get(type(trainer).__module__)


class DasslAdapter:
    """Base adapter: prompt parameters by name pattern, optimisers from ``register_model``, logits
    and cross-entropy from ``trainer.model``, CoOp-style class buffers of ``model.prompt_learner``."""

    #: regular expression (``re.search``) selecting prompt parameters among trainable ones
    prompt_pattern: str = r"^prompt_learner\."
    #: the trainer's yacs node under ``cfg.TRAINER`` (``"COOP"``), or ``None``
    cfg_node: Optional[str] = None
    #: the method's name in exported inits (``MP-<family>``, ``GRAM-<family>``); ``None``: meta-training
    #: through this trainer is not supported
    family: Optional[str] = None
    #: the method name when a regulator is learned jointly (default ``GRAM-<family>``)
    regulated_name: Optional[str] = None
    #: ``CustomCLIP.forward`` returns the loss while ``prompt_learner.training`` is set
    returns_loss_while_training: bool = False
    #: the trainer already projects gradients itself (ProGrad's own trainer): refuse a second ProGrad
    projects_itself: bool = False
    #: init tensor names accepted as aliases, e.g. ``{"ctx": "prompt_learner.ctx"}``
    init_aliases: dict = {}
    #: ``trainer.model(images)`` returns the prompted logits while training (not the loss), so ProGrad
    #: takes G_g from the trainer's own forward instead of running a second one
    logits_from_own_forward: bool = False
    #: the prompt learner uses ``CTX_INIT``'s words only when it has at most this many context
    #: tokens (IVLP / MaPLe / PromptSRC: 4); ``None``: whenever ``CTX_INIT`` is set (CoOp, CoCoOp)
    ctx_init_max_tokens: Optional[int] = None

    def __init__(self, trainer):
        if not hasattr(trainer, "model") or not isinstance(getattr(trainer, "model"), nn.Module):
            raise AdapterError(f"{type(trainer).__name__} has no nn.Module `model`: build it with build_trainer(cfg) first")
        self.trainer = trainer

    # -- 1. parameters -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return unwrap(self.trainer.model)

    @property
    def node(self):
        """``trainer.cfg.TRAINER.<cfg_node>`` (``None`` when absent)."""
        try:
            return getattr(self.trainer.cfg.TRAINER, self.cfg_node)
        except (AttributeError, TypeError):
            return None

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

    # -- 3. logits and loss --------------------------------------------------------------------
    def parse_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of a training batch, on the trainer's device."""
        parsed = self.trainer.parse_batch_train(batch)
        return parsed[0], parsed[1]

    def model_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` (the trainer's CustomCLIP, or the same module under
        ``functional_call``). Where the forward returns the loss while ``prompt_learner.training``
        is set, that one flag is cleared for the call (not ``.eval()``: nothing else changes)."""
        pl = getattr(model, "prompt_learner", None)
        if not self.returns_loss_while_training or pl is None:
            return model(images)
        was = pl.training
        pl.training = False
        try:
            return model(images)
        finally:
            pl.training = was

    def prompted_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the prompted model, differentiable in the prompt parameters."""
        return self.model_logits(self.trainer.model, images)

    def method_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss the trainer optimises, on ``model`` (its unwrapped CustomCLIP): cross-entropy of
        its logits, in float32. Meta-training differentiates this through the fast weights."""
        return F.cross_entropy(self.model_logits(model, images).float(), labels)

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

    # -- 4. class-dependent state (meta-training across class sets) ----------------------------
    def method_name(self, regulator: bool, clip_gamma=None) -> str:
        """``GRAM-<family>`` (or :attr:`regulated_name`) with a regulator, else ``MP-<family>[+clip]``."""
        family = self.meta_family()
        if regulator:
            return self.regulated_name or f"GRAM-{family}"
        return f"MP-{family}" + ("+clip" if clip_gamma else "")

    def meta_family(self) -> str:
        if self.family is None:
            supported = [n for n, a in _REGISTRY.items() if a.family is not None]
            raise AdapterError(
                f"meta-training through {type(self.trainer).__name__} is not supported ({type(self).__name__} does not "
                f"say how the trainer builds its class-dependent buffers); supported: {', '.join(supported)}"
            )
        return self.family

    @property
    def prompt_learner(self) -> Optional[nn.Module]:
        return getattr(self.model, "prompt_learner", None)

    def check_meta_trainable(self) -> None:
        """Raise when tasks with other class sets cannot share this trainer's prompts."""
        self.meta_family()
        pl = self.prompt_learner
        if pl is not None and getattr(pl, "ctx", None) is not None and pl.ctx.dim() == 3:
            raise AdapterError("class-specific context (CSC) has one context per class: it cannot be shared by tasks with other classes")

    def class_buffers(self) -> dict:
        """The trainer's own class-dependent state (what :meth:`use_class_buffers` restores)."""
        pl = self.prompt_learner
        if pl is None:
            return {}
        return {"token_prefix": pl.token_prefix, "token_suffix": pl.token_suffix,
                "tokenized_prompts": pl.tokenized_prompts, "n_cls": pl.n_cls}

    def prompt_prefix(self) -> str:
        """The text before each class name in the prompt learner's prompts."""
        n_ctx = self.prompt_learner.n_ctx
        ctx_init = str(getattr(self.node, "CTX_INIT", "") or "")
        if ctx_init and (self.ctx_init_max_tokens is None or n_ctx <= self.ctx_init_max_tokens):
            return ctx_init.replace("_", " ")
        return " ".join(["X"] * n_ctx)

    @torch.no_grad()
    def build_class_buffers(self, classnames: Sequence[str], clip_model, tokenize: Callable) -> dict:
        """:meth:`class_buffers` for ``classnames``, built as the trainer's ``__init__`` builds them
        from ``clip_model`` (frozen, prompt-free, the trainer's weights) and ``tokenize``."""
        pl = self.prompt_learner
        if pl is None:
            return {}
        own = self.class_buffers()
        names = [c.replace("_", " ") for c in classnames]
        tokenized = tokenize([self.prompt_prefix() + " " + n + "." for n in names])
        emb = clip_model.token_embedding(tokenized.to(clip_model.token_embedding.weight.device))
        device, dtype = own["token_prefix"].device, own["token_prefix"].dtype
        return {"token_prefix": emb[:, :1, :].to(device, dtype), "token_suffix": emb[:, 1 + pl.n_ctx:, :].to(device, dtype),
                "tokenized_prompts": tokenized.to(own["tokenized_prompts"].device), "n_cls": len(names)}

    def frozen_clip(self):
        """The frozen, prompt-free CLIP the trainer was built from, float32: what
        :meth:`build_class_buffers` embeds class names with. Default: the trainer module's
        ``load_clip_to_cpu(cfg)`` (CoOp-style repositories)."""
        load = getattr(trainer_module(self.trainer), "load_clip_to_cpu", None)
        if load is None:
            raise AdapterError(f"{type(self.trainer).__module__} has no load_clip_to_cpu(cfg): pass clip_model= to meta_train")
        return load(self.trainer.cfg).float().eval()

    def tokenizer(self) -> Callable:
        """The tokenizer the trainer built its prompts with: its module's ``clip.tokenize``."""
        tokenize = getattr(getattr(trainer_module(self.trainer), "clip", None), "tokenize", None)
        if tokenize is None:
            raise AdapterError(f"{type(self.trainer).__module__} has no clip.tokenize: pass tokenize= to meta_train")
        return tokenize

    def use_class_buffers(self, state: dict) -> None:
        """Put ``state`` (from :meth:`class_buffers` / :meth:`build_class_buffers`) into the model."""
        pl = self.prompt_learner
        if pl is None:
            return
        pl.token_prefix = state["token_prefix"]  # assignment to a registered buffer replaces it
        pl.token_suffix = state["token_suffix"]
        pl.tokenized_prompts = state["tokenized_prompts"]
        pl.n_cls = state["n_cls"]
        self.model.tokenized_prompts = state["tokenized_prompts"]


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


def adapter_class(trainer_cls: type) -> "type[DasslAdapter]":
    """The registered adapter class for a trainer class (looked up by class name along its MRO)."""
    for klass in trainer_cls.__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__]
    raise AdapterError(
        f"no gram-plugin adapter for trainer {trainer_cls.__name__!r}; supported: "
        f"{', '.join(supported_trainers())}. For another trainer pass its prompt parameters: "
        "wrap(trainer, params=['prompt_learner.ctx']) or wrap(trainer, pattern=r'^prompt_learner\\.')"
    )


def adapter_for(trainer) -> DasslAdapter:
    """The registered adapter for ``trainer`` (looked up by class name along its MRO)."""
    return adapter_class(type(trainer))(trainer)
