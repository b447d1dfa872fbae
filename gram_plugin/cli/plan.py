"""Every option, the run folder and the init file checked before anything is loaded: :func:`plan`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, integer_at_least
from ..finetune import TuneConfig
from ..meta import MetaConfig
from ..models import PromptConfig
from .options import _PROMPT_FIELDS, CLIError, DataConfig, _as_flags, _flag
from .run_folder import _folder_problems


def _backbone_problems(spec) -> list[str]:
    if not isinstance(spec, str) or not spec:
        return [f"--backbone must be proxy[:DIR], tiny[:SEED] or MODEL:PRETRAINED, got {spec!r}"]
    kind, _, rest = spec.partition(":")
    if kind == "tiny" and rest and not rest.lstrip("-").isdigit():
        return [f"--backbone tiny:SEED needs a whole-number seed, got {rest!r}"]
    return []


@dataclass
class Plan:
    """Everything a command needs, checked before any data is loaded or anything is written."""

    prompt: PromptConfig
    data: DataConfig
    tune: TuneConfig | None = None
    meta: MetaConfig | None = None
    init: object = None  # PromptInit read from --init / --prompt


def _fields(cls, args, **renamed) -> dict:
    """The dataclass's fields that the command line sets (``renamed``: field -> option name)."""
    out = {}
    for f in dataclasses.fields(cls):
        key = renamed.get(f.name, f.name)
        if hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out


def plan(args) -> Plan:
    """Check every option, the run folder and the init file; one ``CLIError`` lists all problems."""
    problems: list[str] = []
    init = None
    init_path = getattr(args, "init", None) or getattr(args, "prompt", None)
    if init_path:
        from ..prompts import PromptInit

        try:
            init = PromptInit.load(init_path)
        except ValueError as e:
            problems.append(str(e))
        else:
            bad = init.nonfinite_names()
            if bad:
                problems.append(f"{init_path} holds non-finite values (NaN or Inf) in {bad}: it is unusable")
            meta = init.metadata
            for key in _PROMPT_FIELDS:
                given = getattr(args, key, None)
                if key in meta and given is not None and given != meta[key]:
                    problems.append(f"{_flag(key)} {given!r} differs from the {key} {meta[key]!r} that {init_path} "
                                    f"was learned with; drop {_flag(key)} or use a matching file")
                elif key in meta:
                    setattr(args, key, meta[key])
    conflicting = bool(problems)
    for key in _PROMPT_FIELDS:  # not given and not fixed by an init: the PromptConfig default
        if getattr(args, key, None) is None:
            setattr(args, key, getattr(PromptConfig, key))
    problems += _backbone_problems(args.backbone)
    problems += _as_flags(integer_at_least("threads", args.threads, 0))
    # an init file replaces the context, so the phrase it would start from does not apply
    ctx_init = None if init is not None or args.ctx_init in (None, "", "random") else args.ctx_init
    factories = {"data": lambda: DataConfig(**_fields(DataConfig, args))}
    if not conflicting:  # with a conflict the prompt settings are a mix of the file's and the flags'
        factories["prompt"] = lambda: PromptConfig(**{**_fields(PromptConfig, args), "ctx_init": ctx_init})
    if hasattr(args, "epochs"):
        factories["tune"] = lambda: TuneConfig(**{**_fields(TuneConfig, args, prograd_lambda="prograd"),
                                                  "use_regulator": not args.no_regulator})
    if hasattr(args, "meta_steps"):
        factories["meta"] = lambda: MetaConfig(**_fields(MetaConfig, args, steps="meta_steps"),
                                               progress=not args.quiet)
    built = {}
    for key, make in factories.items():
        try:
            built[key] = make()
        except ConfigError as e:
            problems += _as_flags(e.problems)
    problems += _folder_problems(args)
    if problems:
        raise CLIError("invalid input:\n  - " + "\n  - ".join(problems))
    return Plan(init=init, **built)
