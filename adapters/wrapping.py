"""``wrap(trainer, config)``: plug GRAM into a built Dassl trainer, in three steps.

1. **resolve** (:func:`resolve_config`): the :class:`WrapConfig` -- the one given, else
   ``trainer.cfg.GRAM``'s -- with every explicit keyword argument replacing its field. Explicit
   arguments always win; ``GRAM.ENABLED False`` only means that the node contributes nothing.
2. **check** (:func:`check`): everything that can fail -- the adapter, the prompts, ProGrad's
   teacher, the init's fit (and, when it does not fit, which trainer it was learned for), the
   regulator's fit to the prompt widths, the optimisers -- into a :class:`WrapPlan`. Nothing of the
   trainer is touched.
3. **apply** (:meth:`WrapPlan.apply`): copy the init in place, install the regulated step as a step
   pre-hook on every optimiser owning the prompts (``chain(prograd, regulate, clip)``) and, for
   ProGrad, the supply of G_g (:mod:`.general_gradients`). Returns a :class:`GramWrap` handle.

So a failed ``wrap`` leaves the trainer as it was.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from gram_plugin.hooks import install_gradient_transform
from gram_plugin.prompts import PromptInit, PromptInitError
from gram_plugin.regulator import GradientRegulator
from gram_plugin.transforms import chain, clip_meta, prograd as prograd_transform, regulate

from .base import AdapterError, DasslAdapter, GenericAdapter, ZeroShotTeacher, adapter_for
from .config import WrapConfig
from .general_gradients import GeneralGradients

#: an argument the caller did not give (``None`` is a value: "no regulator")
UNSET = object()


@dataclass
class GramWrap:
    """What ``wrap`` did to a trainer; ``remove()`` undoes the hooks and the ProGrad wrapper
    (the copied init stays)."""

    trainer: object
    adapter: Optional[DasslAdapter] = None
    config: Optional[WrapConfig] = None
    params: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    init_names: list = field(default_factory=list)
    regulator: Optional[GradientRegulator] = None
    teacher: Optional[ZeroShotTeacher] = None
    transform: Optional[Callable] = None
    general: Optional[GeneralGradients] = None
    enabled: bool = True

    def remove(self) -> None:
        """Uninstall the step hooks and restore the trainer's own ``forward_backward``."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.general is not None:
            self.general.remove()
            self.general = None
        if getattr(self.trainer, "_gram_wrap", None) is self:
            del self.trainer._gram_wrap

    def __repr__(self) -> str:
        if not self.enabled:
            return "GramWrap(disabled: cfg.GRAM.ENABLED is False)"
        return (
            f"GramWrap({type(self.trainer).__name__}, adapter={type(self.adapter).__name__}, "
            f"params={ {n: tuple(p.shape) for n, p in self.params.items()} }, init={self.init_names}, "
            f"transform={self.transform!r})"
        )


@dataclass
class WrapPlan:
    """Everything ``wrap`` will do, checked (:func:`check`); :meth:`apply` does it."""

    trainer: object
    adapter: DasslAdapter
    config: WrapConfig
    prompts: dict
    init: Optional[PromptInit]
    regulator: Optional[GradientRegulator]
    teacher: Optional[ZeroShotTeacher]
    transform: Optional[Callable]
    optimizers: list

    def apply(self) -> GramWrap:
        """Copy the init into the prompts (in place, so optimiser references stay valid), install the
        transform on the optimisers and ProGrad's G_g supply. Returns the handle."""
        cfg = self.config
        handle = GramWrap(self.trainer, self.adapter, cfg, self.prompts, regulator=self.regulator, teacher=self.teacher,
                          transform=self.transform)
        if self.init is not None:
            handle.init_names = self.init.apply_to(self.prompts, backbone=cfg.backbone, strict=cfg.strict)
        self.trainer._gram_wrap = handle
        if self.transform is None:
            return handle
        if self.teacher is not None:
            handle.general = GeneralGradients(self.trainer, self.adapter, self.teacher, self.prompts)
        arguments = handle.general.arguments if handle.general is not None else None
        handle.hooks = [install_gradient_transform(opt, self.prompts, self.transform, arguments) for opt in self.optimizers]
        if handle.general is not None:
            handle.general.install()
        return handle


# -- 1. resolve ------------------------------------------------------------------------------------
def resolve_config(trainer, config: Optional[WrapConfig] = None, **explicit) -> Optional[WrapConfig]:
    """The config ``wrap`` applies: ``config`` (or, without one, ``trainer.cfg.GRAM``'s settings)
    with each explicit keyword argument (a :class:`WrapConfig` field not :data:`UNSET`) replacing
    its field. ``None``: nothing to do (``GRAM.ENABLED`` False and no explicit argument).

    Raises ``AdapterError`` when nothing says what to do (no config, no ``cfg.GRAM``, no argument),
    ``ConfigError`` for invalid values (named by their ``GRAM.*`` key when they come from the cfg).
    """
    explicit = {k: v for k, v in explicit.items() if v is not UNSET}
    unknown = set(explicit) - {f.name for f in dataclasses.fields(WrapConfig)}
    if unknown:
        raise TypeError(f"wrap got unknown options {sorted(unknown)}")
    if config is not None:
        if not isinstance(config, WrapConfig):
            raise TypeError(
                f"wrap(trainer, config): config must be a WrapConfig, got {type(config).__name__}; "
                "pass an init file as wrap(trainer, init=...)"
            )
        base = config
    elif getattr(getattr(trainer, "cfg", None), "GRAM", None) is not None:
        base = WrapConfig.from_cfg(trainer.cfg)
        if base is None:  # GRAM.ENABLED False: the node contributes nothing
            if not explicit:
                return None
            base = WrapConfig()
    elif explicit:
        base = WrapConfig()
    else:
        raise AdapterError(
            "wrap(trainer) without arguments reads trainer.cfg.GRAM, which is missing: call "
            "add_gram_cfg(cfg) in extend_cfg, or pass init=/regulator=/prograd=/clip= (or a WrapConfig)"
        )
    return dataclasses.replace(base, **explicit) if explicit else base


# -- 2. check --------------------------------------------------------------------------------------
def _source(spec) -> str:
    return str(spec) if isinstance(spec, (str, os.PathLike)) else f"the {type(spec).__name__} given"


def _load(spec, what: str) -> PromptInit:
    return spec if isinstance(spec, PromptInit) else PromptInit.load(spec, what=what)


def _aliased(init: PromptInit, prompts: dict, aliases: dict) -> PromptInit:
    """``init`` with tensor names the trainer does not have mapped through ``aliases`` (e.g. the
    standalone ``PromptedCLIP``'s ``ctx`` to CoOp's ``prompt_learner.ctx``)."""
    mapping = {n: aliases[n] for n in init.tensors if n not in prompts and n in aliases}
    if not mapping:
        return init
    tensors = type(init.tensors)((mapping.get(n, n), t) for n, t in init.tensors.items())
    return PromptInit(tensors, dict(init.metadata), dict(init.regulator_state))


def _check_init(trainer, init: PromptInit, source: str, prompts: dict, config: WrapConfig) -> None:
    problems = init.check_against(prompts, backbone=config.backbone, strict=config.strict)
    if not problems:
        return
    learned_for = init.metadata.get("trainer")
    own_names = {k.__name__ for k in type(trainer).__mro__}
    if isinstance(learned_for, str) and learned_for not in own_names:  # the file says whose it is
        this = type(trainer).__name__
        method = init.metadata.get("method_name") or init.metadata.get("method")
        raise PromptInitError(
            f"init {source} was learned for the {learned_for} trainer{f' ({method})' if method else ''}, not {this}: "
            f"it does not fit {this}'s prompts ({problems[0]}{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}). "
            f"Meta-train an init through {this} (gram-plugin meta-train --dassl-config ... --trainer {this})"
        )
    raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))


def _resolve_regulator(spec, init: Optional[PromptInit], config: WrapConfig) -> tuple[Optional[GradientRegulator], str]:
    """(the regulator ``spec`` asks for, where it comes from)."""
    if spec is None:
        return None, ""
    if isinstance(spec, GradientRegulator):
        return spec, "the GradientRegulator given"
    if spec is True or spec == "init":
        source = f"the init {_source(config.init)}"
        reg = GradientRegulator.from_init(init) if init is not None else None
        if reg is None and spec is True:  # asked for explicitly: its absence is an error
            if init is None:
                raise PromptInitError("regulator=True uses the regulator saved with the init, but no init was given (pass init=...)")
            raise PromptInitError(
                f"regulator=True uses the regulator saved with the init, but the init {_source(config.init)} holds none: "
                "meta-train one with a regulator (gram-plugin meta-train --dassl-config ... learns one unless --no-regulator), "
                "or pass regulator=None"
            )
        return reg, source
    source = f"regulator file {spec}" if isinstance(spec, (str, os.PathLike)) else "the PromptInit given as regulator"
    reg = GradientRegulator.from_init(_load(spec, "regulator file"))
    if reg is None:
        raise PromptInitError(f"{source} holds no regulator")
    return reg, source


def _check_regulator(reg: GradientRegulator, source: str, prompts: dict, aliases: dict, trainer) -> GradientRegulator:
    mapping = {n: aliases[n] for n in reg.shapes if n not in prompts and n in aliases}
    reg = reg.renamed(mapping)
    if not any(reg.has_head(n) for n in prompts):
        raise AdapterError(f"the regulator ({source}) has heads for {list(reg.shapes)}, none of which is a prompt of "
                           f"{type(trainer).__name__}: {list(prompts)}")
    problems = reg.fit_problems({n: tuple(p.shape) for n, p in prompts.items()})
    if problems:
        raise AdapterError(
            f"the regulator ({source}) was learned for another embedding width than {type(trainer).__name__}'s prompts "
            f"(another backbone?): {'; '.join(problems)}. Use the regulator meta-trained with this backbone"
        )
    return reg


def check(trainer, config: WrapConfig, *, params=None, pattern: Optional[str] = None,
          teacher: Optional[Callable] = None, adapter: Optional[DasslAdapter] = None) -> WrapPlan:
    """Check that ``config`` can be applied to ``trainer``; touches nothing of the trainer.

    Raises ``AdapterError`` (no adapter / prompts / optimiser / teacher, a regulator that does not
    fit the prompt widths, already wrapped) or ``PromptInitError`` (an unreadable init or regulator
    file, an init that does not fit -- saying which trainer it was learned for when the file
    records another).
    """
    previous = getattr(trainer, "_gram_wrap", None)
    if previous is not None:
        raise AdapterError(
            f"{type(trainer).__name__} is already wrapped ({previous!r}); call .remove() on the handle "
            "wrap returned before wrapping again"
        )
    if adapter is None:
        adapter = GenericAdapter(trainer, names=params, pattern=pattern) if (params is not None or pattern is not None) else adapter_for(trainer)
    adapter.prepare()
    prompts = adapter.prompt_parameters()
    aliases = {**adapter.init_aliases, **(config.rename or {})}

    chosen_teacher = None
    if config.prograd is not None:
        if adapter.projects_itself:
            raise AdapterError(
                f"{type(trainer).__name__} already projects its gradients (ProGrad's own trainer, LOSS.LAMBDA); "
                "do not ask wrap for prograd as well"
            )
        chosen_teacher = adapter.make_teacher(teacher)
        chosen_teacher.prepare()  # before the init overwrites what it needs (CoOp's hand-crafted context)
        problem = chosen_teacher.problem()
        if problem:
            raise AdapterError(problem)

    init = None
    if config.init is not None:
        original = _load(config.init, "init file")
        init = _aliased(original, prompts, aliases)
        _check_init(trainer, init, _source(config.init), prompts, config)
    else:
        original = None

    reg, source = _resolve_regulator(config.regulator, original, config)
    if reg is not None:
        reg = _check_regulator(reg, source, prompts, aliases, trainer)
        reg = reg.to(next(iter(prompts.values())).device).eval().requires_grad_(False)

    steps = []
    if config.prograd is not None:
        steps.append(prograd_transform(float(config.prograd)))
    if reg is not None:
        steps.append(regulate(reg))
    if config.clip is not None:
        steps.append(clip_meta(float(config.clip)))
    optimizers = []
    if steps:
        for opt in adapter.optimizers():
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            if any(id(p) in owned for p in prompts.values()):
                optimizers.append(opt)
        if not optimizers:
            raise AdapterError(f"no registered optimiser of {type(trainer).__name__} owns the prompt parameters {list(prompts)}")
    transform = None if not steps else (steps[0] if len(steps) == 1 else chain(*steps))
    return WrapPlan(trainer, adapter, config, prompts, init, reg, chosen_teacher, transform, optimizers)


# -- the one call ----------------------------------------------------------------------------------
def wrap(
    trainer,
    config: Optional[WrapConfig] = None,
    *,
    init=UNSET,
    regulator=UNSET,
    prograd=UNSET,
    clip=UNSET,
    strict=UNSET,
    backbone=UNSET,
    rename=UNSET,
    params=None,
    pattern: Optional[str] = None,
    teacher: Optional[Callable] = None,
    adapter: Optional[DasslAdapter] = None,
) -> GramWrap:
    """Plug GRAM into a built Dassl trainer: ``wrap(trainer, init="init.safetensors", regulator=True)``.

    Args:
        trainer: the object ``build_trainer(cfg)`` returned.
        config: a :class:`WrapConfig`; without one, ``trainer.cfg.GRAM`` (:func:`add_gram_cfg`).
        init, regulator, prograd, clip, strict, backbone, rename: :class:`WrapConfig`'s fields; each
            one given replaces the config's (explicit arguments always win, also over ``cfg.GRAM``
            and over ``GRAM.ENABLED False``).
        params / pattern: prompt parameter names or regex, for trainers without an adapter.
        teacher: ``images -> zero-shot logits`` for ProGrad, replacing the adapter's own teacher.
        adapter: an adapter instance to use instead of the registered one.

    The regulator must fit the prompts' embedding widths (a regulator from another backbone is
    refused); one learned with another number of context tokens, or without CSC's class
    dimension, is accepted: its maps act on the width and are shared across tokens, so each row is
    regulated as in meta-training. An init that does not fit is refused, and where its file
    records another trainer the error says which.

    All-or-nothing: :func:`check` finds every problem before :meth:`WrapPlan.apply` touches a
    parameter, optimiser or method, so a failed wrap leaves the trainer as it was. Returns the
    :class:`GramWrap` handle (disabled when ``cfg.GRAM.ENABLED`` is False and nothing was given).
    Raises ``AdapterError``, ``PromptInitError`` or ``ConfigError``.
    """
    resolved = resolve_config(trainer, config, init=init, regulator=regulator, prograd=prograd, clip=clip,
                              strict=strict, backbone=backbone, rename=rename)
    if resolved is None:
        if getattr(trainer, "_gram_wrap", None) is not None:
            raise AdapterError(f"{type(trainer).__name__} is already wrapped; call .remove() on the handle first")
        return GramWrap(trainer, enabled=False)
    return check(trainer, resolved, params=params, pattern=pattern, teacher=teacher, adapter=adapter).apply()
