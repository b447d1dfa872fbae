"""The ``PromptInit`` artefact (and, from :mod:`gram_plugin.marking`, marking prompt parameters).

``PromptInit`` is one ``.safetensors`` file: the prompt tensors under their names, the regulator's
tensors under ``regulator.<key>``, and a JSON document in the safetensors header metadata (method,
names, shapes, dtypes, backbone, n_ctx, source tasks, regulator config, ...). Loading it never
executes code from the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import PromptInitError
from .marking import mark_prompts, prompt_parameters, strip_wrapper_prefix, unmark_prompts  # noqa: F401 (re-exported)
from .regulator import regulator_config_problems
from .safeio import load_tensors, save_tensors

FORMAT_VERSION = 2  # 2: the regulator config always records its scale
_REGULATOR_PREFIX = "regulator."
FILE_KIND = "prompt-init"


# Metadata keys gram-plugin reads back, and the JSON types they must have.
_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "method": (str,), "backbone": (str,), "mode": (str,), "n_ctx": (int,),
    "n_vpt": (int,), "vpt_deep": (bool,), "ctx_init": (str, type(None)), "regulator_config": (dict,),
}


def metadata_problems(meta: Mapping) -> list[str]:
    """Every way an init file's metadata breaks the schema (wrong JSON types, no tensor names)."""
    problems = []
    names = meta.get("names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        problems.append(f"'names' must be a non-empty list of tensor names, got {names!r}")
    for key, types in _METADATA_TYPES.items():
        v = meta.get(key)
        # bool is an int in Python; an int field holding true/false is still wrong
        if key in meta and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{key!r} must be {want}, got {v!r}")
    rc = meta.get("regulator_config")
    if isinstance(rc, dict) and not isinstance(rc.get("shapes"), dict):
        problems.append("'regulator_config' needs a 'shapes' mapping")
    return problems


def _upgrade(metadata: dict, version: int) -> dict:
    """Fill keys that older format versions did not record with what those versions meant."""
    rc = metadata.get("regulator_config")
    if version < 2 and isinstance(rc, dict) and "scale" not in rc:
        # version 1 files written before the regulator had a scale option hold absolute-scale heads
        metadata["regulator_config"] = {**rc, "scale": "absolute"}
    return metadata


@dataclass
class PromptInit:
    """A meta-learned prompt initialisation (and, optionally, the regulator learned with it).

    ``tensors``: prompt tensors by (prefix-free) parameter name. ``regulator_state``: the
    ``GradientRegulator`` state dict; ``metadata`` holds everything else, JSON-serialisable
    (``method``, ``backbone``, ``n_ctx``, ``source_tasks``, ``regulator_config``, ...).
    """

    tensors: "OrderedDict[str, torch.Tensor]"
    metadata: dict = field(default_factory=dict)
    regulator_state: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = field(default=None, repr=False, compare=False)  # the file it was loaded from, for errors

    @classmethod
    def from_module(cls, module: nn.Module, **metadata: Any) -> "PromptInit":
        """A copy of ``module``'s marked prompt tensors, with ``metadata``."""
        tensors = OrderedDict((n, p.detach().clone()) for n, p in prompt_parameters(module).items())
        return cls(tensors, dict(metadata))

    @property
    def regulator_config(self) -> dict | None:
        """The saved regulator's constructor options (``GradientRegulator.from_config``), or ``None``."""
        return self.metadata.get("regulator_config")

    def nonfinite_names(self) -> list[str]:
        """Tensors (prompt, and ``regulator.<key>``) holding a NaN or an infinity."""
        tensors = {**self.tensors, **{_REGULATOR_PREFIX + k: v for k, v in self.regulator_state.items()}}
        return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    def describe(self) -> dict:
        """What the file holds (metadata, names, shapes, dtypes, whether it has a regulator), as ``gram-plugin inspect`` prints it."""
        return {
            **self.metadata,
            "names": list(self.tensors),
            "shapes": {n: list(t.shape) for n, t in self.tensors.items()},
            "dtypes": {n: str(t.dtype).replace("torch.", "") for n, t in self.tensors.items()},
            "has_regulator": bool(self.regulator_state),
        }

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the init atomically as a checked ``.safetensors`` file; returns the path.

        Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is not set."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        names = list(self.tensors)
        bad = [n for n in names if n.startswith(_REGULATOR_PREFIX)]
        if bad:
            raise PromptInitError(f"prompt names may not start with {_REGULATOR_PREFIX!r}: {bad}")
        meta = {**self.describe(), "format_version": FORMAT_VERSION}
        tensors = dict(self.tensors)
        tensors.update({_REGULATOR_PREFIX + k: v for k, v in self.regulator_state.items()})
        save_tensors(path, tensors, meta, kind=FILE_KIND)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "init file") -> "PromptInit":
        """Read an init written by :meth:`save` (no code from the file is executed).

        ``what`` names the file in errors (``"regulator file"`` where the file is read for its
        regulator). Raises :class:`PromptInitError` for a missing, damaged or foreign file, invalid
        metadata or a newer format version.
        """
        tensors, meta = load_tensors(path, what=what, error=PromptInitError, kind=FILE_KIND)
        problems = metadata_problems(meta)
        if problems:
            raise PromptInitError(f"{what} {path} has invalid metadata: " + "; ".join(problems))
        if meta.get("format_version", 1) > FORMAT_VERSION:
            raise PromptInitError(
                f"{what} {path} has format version {meta['format_version']}; this gram-plugin "
                f"reads up to {FORMAT_VERSION}: upgrade gram-plugin"
            )
        names = meta["names"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise PromptInitError(f"{what} {path} lists tensors it does not contain: {missing}")
        prompts = OrderedDict((n, tensors[n]) for n in names)
        reg = {k[len(_REGULATOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(_REGULATOR_PREFIX)}
        metadata = {k: v for k, v in meta.items() if k not in ("names", "shapes", "dtypes", "has_regulator", "format_version", "kind")}
        problems = regulator_config_problems(metadata.get("regulator_config"), prompts, reg)
        if problems:
            raise PromptInitError(f"init file {path} has a regulator that does not fit its prompts: " + "; ".join(problems))
        init = cls(prompts, _upgrade(metadata, meta.get("format_version", 1)), reg)
        init.source = str(path)
        return init

    # -- applying ------------------------------------------------------------------------------
    def check_against(
        self,
        targets: Mapping[str, torch.Tensor],
        backbone: str | None = None,
        strict: bool = True,
    ) -> list[str]:
        """Every reason this init does not fit ``targets`` ({name: tensor}); empty when it fits."""
        problems = []
        targets = {strip_wrapper_prefix(k): v for k, v in targets.items()}
        mine = self.metadata.get("backbone")
        if backbone is not None and mine is not None and mine != backbone:
            problems.append(f"backbone: init was learned on {mine!r}, model is {backbone!r}")
        if strict:
            for n in targets:
                if n not in self.tensors:
                    problems.append(f"missing in init: {n} {tuple(targets[n].shape)}")
        for n, t in self.tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{n} holds non-finite values (NaN or Inf): the init is unusable")
            if n not in targets:
                problems.append(f"not a prompt parameter of the model: {n} {tuple(t.shape)}")
                continue
            dst = targets[n]
            if tuple(dst.shape) != tuple(t.shape):
                problems.append(f"shape of {n}: init {tuple(t.shape)} vs model {tuple(dst.shape)}")
            if not (t.is_floating_point() and dst.is_floating_point()):
                problems.append(f"dtype of {n}: init {t.dtype} vs model {dst.dtype} (both must be floating point)")
        return problems

    @torch.no_grad()
    def apply_to(
        self,
        target: nn.Module | Mapping[str, torch.Tensor],
        backbone: str | None = None,
        strict: bool = True,
    ) -> list[str]:
        """Copy the init into the module's marked prompts (or a {name: tensor} map) in place.

        In place (``param.data.copy_``) so optimisers holding the parameters stay valid. Checks
        names, shapes, dtypes and backbone first and raises one ``PromptInitError`` listing every
        mismatch; nothing is copied unless everything fits. Returns the names written.
        """
        targets = prompt_parameters(target) if isinstance(target, nn.Module) else dict(target)
        targets = {strip_wrapper_prefix(k): v for k, v in targets.items()}
        problems = self.check_against(targets, backbone=backbone, strict=strict)
        if problems:
            raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))
        for n, t in self.tensors.items():
            targets[n].data.copy_(t.to(device=targets[n].device, dtype=targets[n].dtype))
        return list(self.tensors)
