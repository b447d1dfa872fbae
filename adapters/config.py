"""What ``wrap`` is asked to do: :class:`WrapConfig`, from keyword arguments or the ``cfg.GRAM`` yacs node.

In the fork's ``train.py``::

    def extend_cfg(cfg):
        ...
        from gram_plugin.adapters import add_gram_cfg
        add_gram_cfg(cfg)

then ``--config-file configs/trainers/CoOp/vit_b16_gram.yaml`` or ``GRAM.ENABLED True GRAM.INIT path
GRAM.PROGRAD True`` on the command line, and ``wrap(trainer)`` reads ``trainer.cfg.GRAM``. The
defaults have one home, :class:`WrapConfig`; ``add_gram_cfg`` writes them into the node.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Union

from gram_plugin.config import raise_problems
from gram_plugin.prompts import PromptInit
from gram_plugin.regulator import GradientRegulator

#: the ``cfg.GRAM`` key of each :class:`WrapConfig` field (``prograd`` is ``PROGRAD`` + ``PROGRAD_LAMBDA``)
CFG_KEYS = {"init": "GRAM.INIT", "regulator": "GRAM.REGULATOR", "prograd": "GRAM.PROGRAD_LAMBDA", "clip": "GRAM.CLIP",
            "strict": "GRAM.STRICT", "backbone": "GRAM.BACKBONE", "rename": "rename"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class WrapConfig:
    """What :func:`gram_plugin.adapters.wrap` does to a trainer; every field is checked on creation.

    Args:
        init: the meta-learned init copied into the prompts (a ``.safetensors`` path or a
            ``PromptInit``), or ``None`` to keep the trainer's own.
        regulator: ``"init"`` (the regulator saved with ``init``, if any), ``True`` (the same, and an
            error if it holds none), a path / ``PromptInit`` holding one, a ``GradientRegulator``, or
            ``None`` for no regulation.
        prograd: ProGrad's lambda (``True`` = 1.0), or ``None`` for no projection.
        clip: clip the prompt gradients' global L2 norm at this value after regulation (``None`` or
            0: no clipping).
        strict: every prompt parameter must be in ``init`` (else, e.g., CoCoOp's Meta-Net keeps its
            own init).
        backbone: check it against the init's recorded backbone (``None``: no check).
        rename: ``{init name: trainer name}`` for init tensors (and regulator heads) named otherwise.

    Raises :class:`gram_plugin.config.ConfigError` listing every bad field.
    """

    init: Union[str, os.PathLike, PromptInit, None] = None
    regulator: Union[str, os.PathLike, PromptInit, GradientRegulator, bool, None] = "init"
    prograd: Optional[float] = None
    clip: Optional[float] = None
    strict: bool = False
    backbone: Optional[str] = None
    rename: Optional[Mapping[str, str]] = None

    def __post_init__(self):
        # normalise the spellings of "off" / "on" first, so equal configs compare equal
        if self.regulator is False:
            object.__setattr__(self, "regulator", None)
        if self.prograd is False:
            object.__setattr__(self, "prograd", None)
        elif self.prograd is True:
            object.__setattr__(self, "prograd", 1.0)
        if self.clip is False or (_number(self.clip) and self.clip == 0):
            object.__setattr__(self, "clip", None)
        raise_problems("wrap options", self.problems(self.__dict__))

    @staticmethod
    def problems(values: Mapping[str, Any], names: Optional[Mapping[str, str]] = None) -> list[str]:
        """Every invalid value among ``values`` (``{field: value}``, a missing field: its default),
        named by ``names`` (``{field: shown name}``; default: the field names)."""
        v = SimpleNamespace(**({f.name: f.default for f in fields(WrapConfig)} | dict(values)))
        name = {f.name: f.name for f in fields(WrapConfig)} | dict(names or {})
        out = []
        if not (v.init is None or isinstance(v.init, PromptInit) or (isinstance(v.init, (str, os.PathLike)) and str(v.init))):
            out.append(f"{name['init']} must be a path to an init file, a PromptInit or None, got {v.init!r}")
        reg = v.regulator
        if not (reg is None or reg is True or isinstance(reg, (PromptInit, GradientRegulator))
                or (isinstance(reg, (str, os.PathLike)) and str(reg))):
            out.append(f"{name['regulator']} must be 'init', True, a path or PromptInit holding a regulator, "
                       f"a GradientRegulator, or None; got {reg!r}")
        lam = v.prograd
        if not (lam is None or isinstance(lam, bool) or (_number(lam) and lam >= 0)):
            out.append(f"{name['prograd']} (ProGrad's lambda) must be a finite number >= 0, True or None; got {lam!r}")
        if not (v.clip is None or v.clip is False or (_number(v.clip) and v.clip >= 0)):
            out.append(f"{name['clip']} must be a finite number > 0 (None or 0: no clipping); got {v.clip!r}")
        if not isinstance(v.strict, bool):
            out.append(f"{name['strict']} must be True or False, got {v.strict!r}")
        if v.backbone is not None and not (isinstance(v.backbone, str) and v.backbone):
            out.append(f"{name['backbone']} must be a backbone name or None, got {v.backbone!r}")
        if v.rename is not None and not (isinstance(v.rename, Mapping)
                                         and all(isinstance(a, str) and isinstance(b, str) for a, b in v.rename.items())):
            out.append(f"{name['rename']} must be a {{init name: trainer name}} dict of strings, got {v.rename!r}")
        return out

    @classmethod
    def from_cfg(cls, cfg) -> Optional["WrapConfig"]:
        """The settings of ``cfg.GRAM`` (see :func:`add_gram_cfg`); ``None`` when ``GRAM.ENABLED`` is
        False. Raises ``AttributeError`` when ``cfg`` has no ``GRAM`` node, ``ConfigError`` (naming
        the ``GRAM.*`` keys) when a value is invalid."""
        node = cfg.GRAM
        if not bool(node.ENABLED):
            return None
        reg = str(node.REGULATOR)
        values = dict(
            init=str(node.INIT) or None,
            regulator=None if reg in ("", "none", "None") else reg,
            prograd=node.PROGRAD_LAMBDA if bool(node.PROGRAD) else None,
            clip=node.CLIP or None,
            strict=node.STRICT,
            backbone=str(node.BACKBONE) or None,
        )
        raise_problems("cfg.GRAM", cls.problems(values, CFG_KEYS))  # named by the cfg's own keys
        return cls(**values)


def add_gram_cfg(cfg) -> None:
    """Add ``cfg.GRAM`` with :class:`WrapConfig`'s defaults (the plug-in is off until ``GRAM.ENABLED True``).

    Raises ``ImportError`` naming the ``dassl`` extra when yacs is missing.
    """
    try:
        from yacs.config import CfgNode as CN
    except ModuleNotFoundError:
        raise ImportError('add_gram_cfg needs yacs, which comes with the \'dassl\' extra: pip install "gram-plugin[dassl]"') from None

    d = WrapConfig()
    cfg.GRAM = CN()
    cfg.GRAM.ENABLED = False
    # PromptInit (.safetensors) with the meta-learned prompts; "" keeps the trainer's own init
    cfg.GRAM.INIT = ""
    # regulate every fine-tuning step: "init" = the regulator saved in INIT (if any),
    # a path = a PromptInit whose regulator is used, "" = no regulator
    cfg.GRAM.REGULATOR = d.regulator
    # ProGrad projection against the zero-shot teacher, and its lambda
    cfg.GRAM.PROGRAD = d.prograd is not None
    cfg.GRAM.PROGRAD_LAMBDA = 1.0
    # clip the prompt gradients' global norm at this value after regulation (0 = off)
    cfg.GRAM.CLIP = float(d.clip or 0.0)
    # every prompt parameter must be covered by INIT (CoCoOp's meta_net may be left out when False)
    cfg.GRAM.STRICT = d.strict
    # check the init's backbone metadata against this name ("" = no check)
    cfg.GRAM.BACKBONE = d.backbone or ""
    # the CLIP weights the trainer's load_clip_to_cpu reads (a cfg-only key, applied by compat.patch_dassl):
    # "" = its own download, a file (OpenAI's .pt, or a CLIP state dict), "random" = a seeded random CLIP
    cfg.GRAM.CLIP_WEIGHTS = ""
