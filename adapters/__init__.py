"""Dassl adapters: the three-line wrap of a built CoOp-family trainer.

In a CoOp fork's ``train.py``::

    trainer = build_trainer(cfg)
    from gram_plugin.adapters import wrap
    wrap(trainer, init="init.safetensors")          # or wrap(trainer): settings from cfg.GRAM

``wrap`` finds the trainer's prompt parameters through its registered adapter, copies the
meta-learned init into them in place (shape-checked; optimiser references stay valid), and installs
the regulated step -- ``chain(prograd, regulate, clip)`` -- as a step pre-hook on every registered
optimiser, so fp16, fp32 and amp (after unscaling) are all caught. With ``prograd`` it also wraps
``forward_backward`` to supply the zero-shot gradient. Trainers without a registered adapter are
wrapped by naming their prompt parameters: ``wrap(trainer, params=[...])`` or ``pattern=...``.

Importing this package imports every module in it, so every trainer adapter (one file each,
registered with :func:`register_adapter`) is known after ``import gram_plugin.adapters``: adding a
trainer is one new file.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional


from gram_plugin.hooks import install_gradient_transform
from gram_plugin.prompts import PromptInit, PromptInitError
from gram_plugin.regulator import GradientRegulator
from gram_plugin.transforms import chain, clip_meta, prograd as prograd_transform, regulate

from .base import AdapterError, DasslAdapter, GenericAdapter, adapter_for, register_adapter, supported_trainers
from .config import add_gram_cfg, options_from_cfg
from .prograd import wrap_forward_backward

__all__ = [
    "wrap",
    "GramWrap",
    "AdapterError",
    "DasslAdapter",
    "GenericAdapter",
    "register_adapter",
    "adapter_for",
    "supported_trainers",
    "add_gram_cfg",
]

_FROM_CFG = object()

# every adapter file registers its trainers on import (PEFT's register_peft_method is the model)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


@dataclass
class GramWrap:
    """What ``wrap`` did to a trainer; ``remove()`` undoes the hooks and the ProGrad wrapper."""

    trainer: object
    adapter: Optional[DasslAdapter] = None
    params: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    init_names: list = field(default_factory=list)
    regulator: Optional[GradientRegulator] = None
    transform: Optional[Callable] = None
    enabled: bool = True

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if getattr(self.trainer, "_gram_wrap", None) is self:
            del self.trainer._gram_wrap
        fb = self.trainer.__dict__.get("forward_backward")
        if fb is not None and hasattr(fb, "__wrapped__"):
            for h in getattr(fb, "_gram_handles", ()):  # ProGrad's forward hooks
                h.remove()
            del self.trainer.forward_backward

    def __repr__(self) -> str:
        if not self.enabled:
            return "GramWrap(disabled: cfg.GRAM.ENABLED is False)"
        return (
            f"GramWrap({type(self.trainer).__name__}, adapter={type(self.adapter).__name__}, "
            f"params={ {n: tuple(p.shape) for n, p in self.params.items()} }, init={self.init_names}, "
            f"transform={self.transform!r})"
        )


def _load_init(init) -> PromptInit:
    if isinstance(init, PromptInit):
        return init
    if isinstance(init, (str, os.PathLike)):
        return PromptInit.load(init)
    raise TypeError(f"init must be a path or a PromptInit, got {type(init).__name__}")


def _resolve_regulator(regulator, init: Optional[PromptInit], init_arg) -> Optional[GradientRegulator]:
    if regulator is None or regulator is False:
        return None
    if isinstance(regulator, GradientRegulator):
        return regulator
    if regulator is True or regulator == "init":
        reg = GradientRegulator.from_init(init) if init is not None else None
        if reg is None and regulator is True:  # asked for explicitly: its absence is an error
            if init is None:
                raise PromptInitError("regulator=True uses the regulator saved with the init, but no init was given (pass init=...)")
            raise PromptInitError(
                f"regulator=True uses the regulator saved with the init, but the init {init_arg} holds none: "
                "meta-train one with a regulator (gram-plugin meta-train --dassl-config ... learns one unless --no-regulator), "
                "or pass regulator=None"
            )
        return reg
    if isinstance(regulator, (str, os.PathLike, PromptInit)):
        source = _load_init(regulator)
        reg = GradientRegulator.from_init(source)
        if reg is None:
            raise PromptInitError(f"regulator: {regulator} holds no regulator")
        return reg
    raise TypeError(
        f"regulator must be True / 'init' (the init's regulator), a GradientRegulator, a PromptInit/path "
        f"holding one, or None; got {type(regulator).__name__}"
    )


def _renamed(init: PromptInit, params: dict, aliases: dict) -> PromptInit:
    """Map init names the trainer does not have through ``aliases`` -- e.g. the standalone
    ``PromptedCLIP``'s ``ctx`` to CoOp's ``prompt_learner.ctx`` -- in the tensors and in the
    regulator saved with them (its per-parameter heads are keyed by name)."""
    mapping = {n: aliases[n] for n in init.tensors if n not in params and n in aliases}
    if not mapping:
        return init
    tensors = type(init.tensors)((mapping.get(n, n), t) for n, t in init.tensors.items())
    metadata, state = dict(init.metadata), dict(init.regulator_state)
    config = metadata.get("regulator_config")
    if config and "shapes" in config:
        metadata["regulator_config"] = {**config, "shapes": {mapping.get(n, n): s for n, s in config["shapes"].items()}}
        if not config.get("share_by_width"):
            heads = {f"heads.{o.replace('.', '__')}.": f"heads.{m.replace('.', '__')}." for o, m in mapping.items()}
            renamed = {}
            for k, v in state.items():
                for old, new in heads.items():
                    if k.startswith(old):
                        k = new + k[len(old):]
                        break
                renamed[k] = v
            state = renamed
    return PromptInit(tensors, metadata, state)


def wrap(
    trainer,
    init=_FROM_CFG,
    regulator=_FROM_CFG,
    prograd=_FROM_CFG,
    clip=_FROM_CFG,
    *,
    params=None,
    pattern: Optional[str] = None,
    teacher: Optional[Callable] = None,
    adapter: Optional[DasslAdapter] = None,
    strict: bool = False,
    backbone: Optional[str] = None,
    rename: Optional[dict] = None,
) -> GramWrap:
    """Plug GRAM into a built Dassl trainer. Returns a :class:`GramWrap` handle.

    Args:
        trainer: the object ``build_trainer(cfg)`` returned.
        init: ``PromptInit`` or path to its ``.safetensors``; swapped into the prompts in place.
        regulator: ``"init"`` (default: the regulator saved with ``init``, if any), ``True`` (the
            regulator saved with ``init``; an error if it holds none), a ``GradientRegulator``, a
            path / ``PromptInit`` holding one, or ``None``.
        prograd: ProGrad lambda (``True`` = 1.0), or ``None`` for no projection.
        clip: clip the prompt gradients' global L2 norm at this value after regulation.
        params / pattern: prompt parameter names or regex, for trainers without an adapter
            (or to override the adapter's selection); ``teacher``: ``images -> zero-shot logits``.
        strict: every prompt parameter must be in ``init`` (else, e.g. CoCoOp's Meta-Net keeps its
            own init). ``backbone``: check it against the init's metadata. ``rename``:
            ``{init name: trainer name}``.

    Called with none of ``init/regulator/prograd/clip``, the settings come from
    ``trainer.cfg.GRAM`` (see :func:`add_gram_cfg`); with ``GRAM.ENABLED False`` nothing is changed.

    All-or-nothing: the init's fit, the regulator, ProGrad's teacher and the optimisers are all
    checked before any parameter, optimiser or method of the trainer is touched.
    """
    previous = getattr(trainer, "_gram_wrap", None)
    if previous is not None:
        raise AdapterError(
            f"{type(trainer).__name__} is already wrapped ({previous!r}); call .remove() on the handle "
            "wrap returned before wrapping again"
        )
    explicit = {k: v for k, v in dict(init=init, regulator=regulator, prograd=prograd, clip=clip).items() if v is not _FROM_CFG}
    if not explicit:
        opts = options_from_cfg(getattr(trainer, "cfg", None))
        if opts is None:
            if getattr(getattr(trainer, "cfg", None), "GRAM", None) is not None:
                return GramWrap(trainer, enabled=False)
            raise AdapterError(
                "wrap(trainer) without arguments reads trainer.cfg.GRAM, which is missing: call "
                "add_gram_cfg(cfg) in extend_cfg, or pass init=/regulator=/prograd=/clip="
            )
        strict = opts.pop("strict")
        backbone = opts.pop("backbone") or backbone
        explicit = opts
    init = explicit.get("init")
    regulator = explicit.get("regulator", "init")
    lam = explicit.get("prograd")
    lam = 1.0 if lam is True else (None if lam is False else lam)
    gamma = explicit.get("clip")

    # Everything is checked before anything is touched: a failed wrap leaves the trainer as it was.
    if adapter is None:
        if params is not None or pattern is not None:
            adapter = GenericAdapter(trainer, names=params, pattern=pattern, teacher=teacher)
        else:
            adapter = adapter_for(trainer)
            if teacher is not None:  # a user-given teacher replaces the adapter's own
                adapter.zero_shot_logits = teacher
    adapter.prepare()  # before the init overwrites anything the adapter needs (e.g. the hand-crafted ctx)
    prompts = adapter.prompt_parameters()

    if lam is not None:
        if adapter.projects_itself:
            raise AdapterError(
                f"{type(trainer).__name__} already projects its gradients (ProGrad's own trainer, LOSS.LAMBDA); "
                "do not ask wrap for prograd as well"
            )
        problem = adapter.teacher_problem()
        if problem:
            raise AdapterError(problem)
        if float(lam) < 0:
            raise ValueError(f"prograd lambda must be >= 0, got {lam}")

    loaded = None
    if init is not None:
        loaded = _renamed(_load_init(init), prompts, {**adapter.init_aliases, **(rename or {})})
        problems = loaded.check_against(prompts, backbone=backbone, strict=strict)
        if problems:
            raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))

    reg = _resolve_regulator(regulator, loaded, init)
    steps = []
    if lam is not None:
        steps.append(prograd_transform(float(lam)))
    if reg is not None:
        if not any(reg.has_head(n) for n in prompts):
            raise AdapterError(f"the regulator has heads for {list(reg.shapes)}, none of which is a prompt of this trainer: {list(prompts)}")
        reg = reg.to(next(iter(prompts.values())).device).eval().requires_grad_(False)
        steps.append(regulate(reg))
    if gamma:
        steps.append(clip_meta(float(gamma)))
    optimizers = []
    if steps:
        for opt in adapter.optimizers():
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            if any(id(p) in owned for p in prompts.values()):
                optimizers.append(opt)
        if not optimizers:
            raise AdapterError(f"no registered optimiser of {type(trainer).__name__} owns the prompt parameters {list(prompts)}")

    # -- all checked: act
    handle = GramWrap(trainer, adapter, prompts, regulator=reg)
    if loaded is not None:
        handle.init_names = loaded.apply_to(prompts, backbone=backbone, strict=strict)
    trainer._gram_wrap = handle
    if not steps:
        return handle
    handle.transform = steps[0] if len(steps) == 1 else chain(*steps)
    handle.hooks = [install_gradient_transform(opt, prompts, handle.transform) for opt in optimizers]
    if lam is not None:
        wrap_forward_backward(trainer, adapter, handle.hooks, prompts)
    return handle
