"""Marking prompt parameters on any ``nn.Module`` and the ``PromptInit`` artefact.

A prompt parameter is marked by an attribute on the ``nn.Parameter`` itself, so the mark survives
wrapping (DataParallel, a trainer holding the module under another name). Names are always reported
without DataParallel's ``module.`` prefixes, so an artefact saved from a wrapped model loads into an
unwrapped one and back.

``PromptInit`` is one ``.safetensors`` file: the prompt tensors under their names, the regulator's
tensors under ``regulator.<key>``, and a JSON document in the safetensors header metadata (method,
names, shapes, dtypes, backbone, n_ctx, source tasks, regulator config, ...). Loading it never
executes code from the file.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .safeio import ArtefactError, load_tensors, save_tensors

_MARK = "_gram_prompt"
FORMAT_VERSION = 2  # 2: the regulator config always records its scale
_REGULATOR_PREFIX = "regulator."
FILE_KIND = "prompt-init"


class PromptInitError(ArtefactError):
    """An init artefact does not fit: unreadable file, or names / shapes / dtypes / backbone differ."""


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
    for p in module.parameters():
        if hasattr(p, _MARK):
            delattr(p, _MARK)


def is_prompt(param: torch.Tensor) -> bool:
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


def regulator_config_problems(config: Any, prompts: Mapping[str, torch.Tensor], regulator_state: Mapping) -> list[str]:
    """Every way an init's ``regulator_config`` disagrees with the prompt tensors it regulates (checked before
    any regulator is built: a config claiming a 30000-wide head would otherwise allocate gigabytes).

    A head for one of the file's prompt tensors must be as wide as it (the regulator acts on the last
    dimension; a head for another name is the applying code's business: ``wrap`` renames and checks it);
    regulator tensors need a config. The option values and the tensors' own layout against the config
    are checked by ``GradientRegulator.init_problems``.
    """
    if config is None:
        return ["it holds regulator tensors but no 'regulator_config' to build the regulator from"] if regulator_state else []
    if not regulator_state:
        return []  # a config without tensors is ignored (no regulator), as before
    shapes = config.get("shapes") if isinstance(config, Mapping) else None
    if not isinstance(shapes, Mapping) or not shapes:
        return ["'regulator_config' needs a non-empty 'shapes' mapping"]
    problems = []
    for name, shape in shapes.items():
        ok = isinstance(shape, (list, tuple)) and shape and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        if not ok:
            problems.append(f"regulator head {name!r}: its shape must be a list of positive integers, got {shape!r}")
        elif name in prompts and (prompts[name].dim() == 0 or shape[-1] != prompts[name].shape[-1]):
            problems.append(f"regulator head {name!r} is {shape[-1]} wide (shape {list(shape)}), the prompt {name} "
                            f"is {tuple(prompts[name].shape)}")
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
        tensors = OrderedDict((n, p.detach().clone()) for n, p in prompt_parameters(module).items())
        return cls(tensors, dict(metadata))

    @property
    def regulator_config(self) -> dict | None:
        return self.metadata.get("regulator_config")

    def nonfinite_names(self) -> list[str]:
        """Tensors (prompt, and ``regulator.<key>``) holding a NaN or an infinity."""
        tensors = {**self.tensors, **{_REGULATOR_PREFIX + k: v for k, v in self.regulator_state.items()}}
        return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    def describe(self) -> dict:
        return {
            **self.metadata,
            "names": list(self.tensors),
            "shapes": {n: list(t.shape) for n, t in self.tensors.items()},
            "dtypes": {n: str(t.dtype).replace("torch.", "") for n, t in self.tensors.items()},
            "has_regulator": bool(self.regulator_state),
        }

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
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
