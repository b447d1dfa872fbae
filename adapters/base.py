"""The adapter contract and its registry: what gram-plugin needs to know about one Dassl trainer.

One file per trainer in ``adapters/trainers/`` subclasses :class:`DasslAdapter` and registers it by
the trainer's class name (``@register_adapter("CoOp")``); ``import gram_plugin.adapters`` imports
that folder, so the registry is complete after that one import (as ``import peft`` fills PEFT's),
and only trainer adapters are imported by it. Nothing trainer-specific lives anywhere else.

The contract (docs/ARCHITECTURE.md, "The adapter contract") has three parts:

1. **Data on the class**, checked when the class is registered (:func:`register_adapter`):
   ``family`` and ``forward_output`` -- stated by every registered class in its own body, never
   inherited (a TCP adapter subclassing KgCoOp must not export ``GRAM-KgCoOp``, nor take its
   logits the way KgCoOp's forward returns them) -- and ``prompt_pattern``, ``cfg_node``,
   ``regulated_name``, ``init_aliases``, ``ctx_init_max_tokens``, ``logits_from_own_forward``,
   ``projects_itself``, ``meta_train_options``, ``teacher`` and ``clip_widths``. Every attribute is documented where
   :class:`DasslAdapter` defines it.
2. **A strategy object for what only some trainers have**: ProGrad's zero-shot teacher, a
   :class:`ZeroShotTeacher` subclass named by ``teacher`` (or ``None``), made by ``wrap`` only when
   ProGrad is asked for.
3. **Methods, overridden where a trainer differs**: :meth:`DasslAdapter.method_loss` (the loss
   meta-training differentiates), :meth:`~DasslAdapter.prepare` (the trainer's own checks before a
   wrap), and for meta-training across class sets :meth:`~DasslAdapter.class_buffers`,
   :meth:`~DasslAdapter.build_class_buffers`, :meth:`~DasslAdapter.use_class_buffers` (plus
   :meth:`~DasslAdapter.prompt_prefix`, :meth:`~DasslAdapter.frozen_clip`,
   :meth:`~DasslAdapter.tokenizer` where the trainer's module differs from CoOp's).

Prompt parameters are those of ``trainer.model`` that require gradients and match
``prompt_pattern``, named relative to ``trainer.model`` with DataParallel's ``module.`` prefix
stripped (``prompt_learner.ctx``), so an init saved on one GPU layout loads on another. Select by
``requires_grad`` as well as by name: PromptSRC keeps a frozen zero-shot encoder inside
``prompt_learner``. The optimisers are every one registered through ``register_model``.

Adding a trainer is one new file in ``adapters/trainers/`` (and its test)::

    @register_adapter("KgCoOp")
    class KgCoOpAdapter(CoOpAdapter):
        family = "KgCoOp"
        forward_output = "logits_first"          # its forward returns (logits, score)
        teacher = HandCraftedTextTeacher
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

from gram_plugin.errors import GramPluginError
from gram_plugin.prompts import strip_wrapper_prefix

_REGISTRY: "OrderedDict[str, type[DasslAdapter]]" = OrderedDict()

#: what ``trainer.model(images)`` returns, by ``forward_output`` (how :meth:`DasslAdapter.model_logits` reads it)
FORWARD_OUTPUTS = {
    "logits": "the logits",
    "logits_first": "a tuple whose first item is the logits (KgCoOp: (logits, score))",
    "loss_while_training": "the loss while prompt_learner.training is set, the logits otherwise (CoCoOp, MaPLe, IVLP, PromptSRC)",
}
#: what every registered adapter class states in its own body: a subclass never inherits them silently
OWN_DECLARATIONS = ("family", "forward_output")


class AdapterError(GramPluginError, ValueError):
    """The trainer does not fit the adapter (no prompt parameters, no optimiser, no teacher, ...),
    or an adapter class breaks the contract."""


def unwrap(module: nn.Module) -> nn.Module:
    """``nn.DataParallel`` / DDP -> the module inside."""
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def trainer_module(trainer):
    """The Python module that defines the trainer's class (its templates, ``load_clip_to_cpu``)."""
    return sys.modules.get(type(trainer).__module__)


class ZeroShotTeacher:
    """ProGrad's zero-shot teacher for one trainer: ``images -> zero-shot logits`` (a strategy object).

    Only some trainers keep what a zero-shot CLIP needs, so the teacher is not part of every
    adapter: an adapter names its teacher class in ``teacher`` and ``wrap`` makes one only when
    ProGrad is asked for. A subclass (in its trainer's adapter file) implements :meth:`logits`;
    it may capture in :meth:`prepare` what the init is about to overwrite (CoOp's hand-crafted
    context), say in :meth:`problem` why it cannot teach, and name the frozen module whose output
    in the trainer's own forward it can reuse (:meth:`features_module`, :meth:`logits_from_features`).
    """

    def __init__(self, adapter: "DasslAdapter"):
        self.adapter = adapter

    @property
    def model(self) -> nn.Module:
        """The trainer's (unwrapped) model."""
        return self.adapter.model

    def prepare(self) -> None:
        """Called by ``wrap`` before the init is copied into the prompts."""

    def problem(self) -> Optional[str]:
        """Why this teacher cannot teach on this trainer (``None``: it can)."""
        return None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of ``images`` (no gradient)."""
        raise NotImplementedError(f"{type(self).__name__}.logits")

    def features_module(self) -> Optional[nn.Module]:
        """The frozen module whose output in the trainer's forward :meth:`logits_from_features` takes (or ``None``)."""
        return None

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits from the output of :meth:`features_module`."""
        raise NotImplementedError(f"{type(self).__name__} does not reuse image features")

    def cosine_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's logits in float32: ``logit_scale.exp() * norm(image) @ norm(text).T`` with the model's scale."""
        f = image_features.float()
        f = f / f.norm(dim=-1, keepdim=True)
        t = text_features.to(f.device).float()
        t = t / t.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * f @ t.t()

    def __repr__(self) -> str:
        return type(self).__name__


class CallableTeacher(ZeroShotTeacher):
    """A teacher given by the user: ``wrap(trainer, prograd=1.0, teacher=<images -> zero-shot logits>)``."""

    def __init__(self, adapter: "DasslAdapter", fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(adapter)
        if not callable(fn):
            raise AdapterError(f"teacher must be a callable images -> zero-shot logits, got {type(fn).__name__}")
        self.fn = fn

    def logits(self, images):
        return self.fn(images)

    def __repr__(self) -> str:
        return f"CallableTeacher({getattr(self.fn, '__name__', type(self.fn).__name__)})"


class DasslAdapter:
    """Base adapter: prompt parameters by name pattern, optimisers from ``register_model``, logits
    and cross-entropy from ``trainer.model``, CoOp-style class buffers of ``model.prompt_learner``.

    The class attributes below are the contract's data; :func:`register_adapter` checks them."""

    #: the method's name in exported inits (``MP-<family>``, ``GRAM-<family>``); ``None``: meta-training
    #: through this trainer is not supported. Stated by every registered class itself.
    family: Optional[str] = None
    #: what ``trainer.model(images)`` returns: a key of :data:`FORWARD_OUTPUTS`. Stated by every
    #: registered class itself; :meth:`model_logits` reads the logits accordingly.
    forward_output: str = "logits"
    #: regular expression (``re.search``) selecting prompt parameters among trainable ones
    prompt_pattern: str = r"^prompt_learner\."
    #: the trainer's yacs node under ``cfg.TRAINER`` (``"COOP"``), or ``None``
    cfg_node: Optional[str] = None
    #: the method name when a regulator is learned jointly (default ``GRAM-<family>``)
    regulated_name: Optional[str] = None
    #: init tensor names accepted as aliases, e.g. ``{"ctx": "prompt_learner.ctx"}`` (the standalone
    #: model's names); a property where they depend on the built model (VPT's per-layer tokens)
    init_aliases: dict = {}
    #: the prompt learner uses ``CTX_INIT``'s words only when it has at most this many context
    #: tokens (IVLP / MaPLe / PromptSRC: 4); ``None``: whenever ``CTX_INIT`` is set (CoOp, CoCoOp)
    ctx_init_max_tokens: Optional[int] = None
    #: the trainer's own ``forward_backward`` runs ``trainer.model(images)`` and gets the logits, so
    #: ProGrad takes G_g from that forward instead of running a second one (needs ``forward_output
    #: == "logits"``)
    logits_from_own_forward: bool = False
    #: the trainer already projects gradients itself (ProGrad's own trainer): refuse a second ProGrad
    projects_itself: bool = False
    #: options meta-training forces on the trainer's config (``"{node}"`` is ``cfg_node``); keys the
    #: trainer's config does not have are left out (:meth:`meta_train_cfg`)
    meta_train_options: dict = {"TRAINER.{node}.PREC": "fp32"}  # second-order gradients need float32
    #: ProGrad's zero-shot teacher (a :class:`ZeroShotTeacher` subclass), or ``None``: ProGrad then
    #: needs ``wrap(..., teacher=<images -> logits>)``
    teacher: Optional[type] = None
    #: (text, vision) CLIP widths the trainer's prompt learner hard-codes (MaPLe: 512, 768): the
    #: random CLIP of ``GRAM.CLIP_WEIGHTS random`` gets them; ``None``: any widths
    clip_widths: Optional[tuple] = None

    def __init__(self, trainer):
        if not hasattr(trainer, "model") or not isinstance(getattr(trainer, "model"), nn.Module):
            raise AdapterError(f"{type(trainer).__name__} has no nn.Module `model`: build it with build_trainer(cfg) first")
        self.trainer = trainer

    # -- 1. parameters -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """``trainer.model`` without a DataParallel / DDP wrapper."""
        return unwrap(self.trainer.model)

    @property
    def node(self):
        """``trainer.cfg.TRAINER.<cfg_node>`` (``None`` when absent)."""
        try:
            return getattr(self.trainer.cfg.TRAINER, self.cfg_node)
        except (AttributeError, TypeError):
            return None

    def prompt_parameters(self) -> "OrderedDict[str, nn.Parameter]":
        """``{name: parameter}`` of the trainable parameters matching :attr:`prompt_pattern`, named
        without a wrapper's ``module.`` prefix. Raises :class:`AdapterError` when none matches."""
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
        """Every optimiser registered through ``register_model`` (and ``trainer.optim``). Raises
        :class:`AdapterError` when there is none."""
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
        ``functional_call``), read as :attr:`forward_output` says: where the forward returns the
        loss while ``prompt_learner.training`` is set, that one flag is cleared for the call (not
        ``.eval()``: nothing else changes); where it returns a tuple, its first item."""
        pl = getattr(model, "prompt_learner", None)
        if self.forward_output == "loss_while_training" and pl is not None:
            was = pl.training
            pl.training = False
            try:
                return model(images)
            finally:
                pl.training = was
        out = model(images)
        return out[0] if self.forward_output == "logits_first" else out

    def prompted_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the prompted model, differentiable in the prompt parameters."""
        return self.model_logits(self.trainer.model, images)

    def method_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss the trainer optimises, on ``model`` (its unwrapped CustomCLIP): cross-entropy of
        its logits, in float32. Meta-training differentiates this through the fast weights."""
        return F.cross_entropy(self.model_logits(model, images).float(), labels)

    def make_teacher(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> ZeroShotTeacher:
        """ProGrad's zero-shot teacher: ``fn`` (``images -> logits``) when given, else one of the
        adapter's :attr:`teacher` class; without either, a teacher whose ``problem()`` says so."""
        if fn is not None:
            return CallableTeacher(self, fn)
        if self.teacher is None:
            return _NoTeacher(self)
        return self.teacher(self)

    def prepare(self) -> None:
        """The trainer's own checks, called by ``wrap`` before anything is changed (raise
        :class:`AdapterError` when the built trainer is not what the adapter expects)."""

    def prepare_meta_training(self) -> None:
        """Make the trainer, built with :meth:`meta_train_cfg`'s options, fit for meta-training where
        those options are not enough (called by ``adapters.meta.meta_train`` before its float32
        check; MaPLe casts upstream's fp16 ``proj``). Default: nothing."""

    def describe(self) -> dict:
        """``{name: shape}`` of the prompt parameters."""
        return {n: tuple(p.shape) for n, p in self.prompt_parameters().items()}

    # -- 4. class-dependent state (meta-training across class sets) ----------------------------
    def method_name(self, regulator: bool, clip_gamma=None) -> str:
        """``GRAM-<family>`` (or :attr:`regulated_name`) with a regulator, else ``MP-<family>[+clip]``."""
        family = self.meta_family()
        if regulator:
            return self.regulated_name or f"GRAM-{family}"
        return f"MP-{family}" + ("+clip" if clip_gamma else "")

    def meta_family(self) -> str:
        """:attr:`family`; raises :class:`AdapterError` where meta-training is not supported."""
        if self.family is None:
            supported = [n for n, a in _REGISTRY.items() if a.family is not None]
            raise AdapterError(
                f"meta-training through {type(self.trainer).__name__} is not supported ({type(self).__name__} does not "
                f"say how the trainer builds its class-dependent buffers); supported: {', '.join(supported)}"
            )
        return self.family

    @classmethod
    def meta_train_cfg(cls, cfg) -> list:
        """``[(key, value), ...]`` that meta-training forces on ``cfg`` for this trainer
        (:attr:`meta_train_options` with ``{node}`` = :attr:`cfg_node`), leaving out keys ``cfg``
        does not have (a trainer whose config has no ``PREC`` has nothing to force there)."""
        out = []
        for key, value in cls.meta_train_options.items():
            if "{node}" in key and cls.cfg_node is None:
                continue
            key = key.format(node=cls.cfg_node)
            node, ok = cfg, True
            for part in key.split("."):
                if not hasattr(node, part):
                    ok = False
                    break
                node = getattr(node, part)
            if ok:
                out.append((key, value))
        return out

    @property
    def prompt_learner(self) -> Optional[nn.Module]:
        """``model.prompt_learner`` (``None`` when the model has none)."""
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


class _NoTeacher(ZeroShotTeacher):
    """The teacher of an adapter that has none: it only says so."""

    def problem(self):
        return (f"{type(self.adapter).__name__} has no zero-shot teacher ({type(self.adapter.trainer).__name__} keeps none): "
                "pass wrap(..., teacher=<images -> zero-shot logits>)")


class GenericAdapter(DasslAdapter):
    """Any trainer: prompt parameters given by exact ``names`` or a regular expression ``pattern``.

    ``logits``: optional ``images -> prompted logits`` callable (default ``trainer.model(images)``).
    ProGrad needs ``wrap(..., teacher=<images -> zero-shot logits>)``.
    """

    def __init__(
        self,
        trainer,
        names: Optional[Iterable[str]] = None,
        pattern: Optional[str] = None,
        logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        super().__init__(trainer)
        if names is None and pattern is None:
            raise AdapterError("GenericAdapter needs names=[...] or pattern=... of the prompt parameters")
        self.names = None if names is None else [strip_wrapper_prefix(n) for n in names]
        if pattern is not None:
            self.prompt_pattern = pattern
        self._logits = logits

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


def contract_problems(cls: type) -> list[str]:
    """Why ``cls`` breaks the adapter contract (empty: it keeps it); what :func:`register_adapter` checks."""
    if not (isinstance(cls, type) and issubclass(cls, DasslAdapter)):
        return [f"{cls!r} is not a DasslAdapter subclass"]
    problems = []
    parent = cls.__mro__[1]
    for name in OWN_DECLARATIONS:
        if name not in cls.__dict__:
            problems.append(f"it must state its own `{name}` (it would inherit {getattr(cls, name)!r} from {parent.__name__})")
    if cls.family is not None and not (isinstance(cls.family, str) and cls.family):
        problems.append(f"family must be a non-empty string or None, got {cls.family!r}")
    if cls.forward_output not in FORWARD_OUTPUTS:
        problems.append(f"forward_output must be one of {list(FORWARD_OUTPUTS)}, got {cls.forward_output!r}")
    owner = next(k for k in cls.__mro__ if "model_logits" in k.__dict__)
    if owner is not cls and owner is not DasslAdapter:
        problems.append(f"it inherits {owner.__name__}.model_logits: state forward_output (or override model_logits) in {cls.__name__}")
    if cls.logits_from_own_forward and cls.forward_output != "logits":
        problems.append(f"logits_from_own_forward is True but forward_output is {cls.forward_output!r}: "
                        "the trainer's own forward gives no logits to take G_g from")
    if isinstance(cls.__dict__.get("prompt_pattern", cls.prompt_pattern), str):
        try:
            re.compile(cls.prompt_pattern)
        except re.error as e:
            problems.append(f"prompt_pattern {cls.prompt_pattern!r} is not a regular expression ({e})")
    else:
        problems.append(f"prompt_pattern must be a regular expression string, got {cls.prompt_pattern!r}")
    if cls.cfg_node is not None and not isinstance(cls.cfg_node, str):
        problems.append(f"cfg_node must be a string or None, got {cls.cfg_node!r}")
    if cls.teacher is not None and not (isinstance(cls.teacher, type) and issubclass(cls.teacher, ZeroShotTeacher)):
        problems.append(f"teacher must be a ZeroShotTeacher subclass or None, got {cls.teacher!r}")
    if not (isinstance(cls.meta_train_options, dict) and all(isinstance(k, str) for k in cls.meta_train_options)):
        problems.append(f"meta_train_options must be a dict of 'KEY.PATH': value, got {cls.meta_train_options!r}")
    widths = cls.clip_widths
    if widths is not None and not (isinstance(widths, tuple) and len(widths) == 2
                                   and all(isinstance(w, int) and w > 0 and w % 64 == 0 for w in widths)):
        problems.append(f"clip_widths must be None or (text width, vision width), positive multiples of 64, got {widths!r}")
    return problems


def register_adapter(*trainer_names: str, replace: bool = False):
    """Class decorator: use this adapter for Dassl trainers of these class names (and their subclasses).

    The class is checked against the contract first (:func:`contract_problems`: its own ``family``
    and ``forward_output``, no inherited ``model_logits``, valid attribute values). A name that
    already has an adapter is refused unless ``replace=True`` (re-importing the same module is no
    conflict). Raises :class:`AdapterError`.
    """
    if not trainer_names or not all(isinstance(n, str) and n for n in trainer_names):
        raise AdapterError(f"register_adapter needs trainer class names, got {trainer_names!r}")

    def deco(cls):
        problems = contract_problems(cls)
        if problems:
            raise AdapterError(f"cannot register {getattr(cls, '__name__', cls)!r} for {', '.join(trainer_names)}: " + "; ".join(problems))
        for name in trainer_names:
            old = _REGISTRY.get(name)
            same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
            if old is not None and not same and not replace:
                raise AdapterError(
                    f"trainer {name!r} already has an adapter ({old.__module__}.{old.__qualname__}); "
                    f"to replace it with {cls.__qualname__}, use register_adapter({name!r}, replace=True)"
                )
        for name in trainer_names:
            _REGISTRY[name] = cls
        return cls

    return deco


def supported_trainers() -> list[str]:
    """The trainer class names that have a registered adapter."""
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
