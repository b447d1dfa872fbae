"""Dassl adapters: the three-line wrap of a built CoOp-family trainer.

In a CoOp fork's ``train.py``::

    trainer = build_trainer(cfg)
    from gram_plugin.adapters import wrap
    wrap(trainer, init="init.safetensors")          # or wrap(trainer): settings from cfg.GRAM

``wrap`` (:mod:`.wrapping`) finds the trainer's prompt parameters through its registered adapter,
copies the meta-learned init into them in place (shape-checked; optimiser references stay valid),
and installs the regulated step -- ``chain(prograd, regulate, clip)`` -- as a step pre-hook on
every registered optimiser, so fp16, fp32 and amp (after unscaling) are all caught. Trainers
without a registered adapter are wrapped by naming their prompt parameters:
``wrap(trainer, params=[...])`` or ``pattern=...``.

The package: :mod:`.base` (the adapter contract and registry), :mod:`.config` (``WrapConfig``,
``cfg.GRAM``), :mod:`.wrapping` (``wrap``: resolve, check, apply), :mod:`.general_gradients`
(ProGrad's G_g), :mod:`.meta` (meta-training through a trainer), :mod:`.compat` (Dassl on modern
torch), and :mod:`.trainers` -- one adapter file per trainer, all registered by
``import gram_plugin.adapters`` (which imports no other module of the package).
"""

from __future__ import annotations

from . import trainers  # noqa: F401  (registers every trainer adapter)
from .base import (
    AdapterError,
    CallableTeacher,
    DasslAdapter,
    GenericAdapter,
    ZeroShotTeacher,
    adapter_class,
    adapter_for,
    contract_problems,
    register_adapter,
    supported_trainers,
)
from .config import WrapConfig, add_gram_cfg
from .wrapping import GramWrap, WrapPlan, check, resolve_config, wrap

__all__ = [
    "wrap",
    "WrapConfig",
    "WrapPlan",
    "GramWrap",
    "resolve_config",
    "check",
    "AdapterError",
    "DasslAdapter",
    "GenericAdapter",
    "ZeroShotTeacher",
    "CallableTeacher",
    "register_adapter",
    "contract_problems",
    "adapter_for",
    "adapter_class",
    "supported_trainers",
    "add_gram_cfg",
]
