"""The parser of every command (each command module adds its own), and ``--config file.yaml`` read into it."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import chc, compare, demo, eval, inspect, meta_train, tune
from .options import RENAMED, CLIError

COMMANDS = (demo, meta_train, tune, eval, inspect, chc, compare)


def build_parser() -> argparse.ArgumentParser:
    """``gram-plugin``'s parser; ``parser.commands`` maps each command's name to its sub-parser."""
    parser = argparse.ArgumentParser(
        prog="gram-plugin", description="gram-plugin command line: meta-train | tune | eval | inspect | demo | chc | "
        "compare. Every command but inspect and compare writes into one run folder (--out).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


def read_yaml(path: str) -> dict:
    """``--config FILE``: a mapping of option: value (plain YAML, no tags); ``CLIError`` otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {p} {'is a folder, not a file' if p.is_dir() else 'does not exist'}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CLIError(f"--config {p} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:  # malformed, or a tag such as !!python/object that safe_load refuses
        raise CLIError(f"--config {p} is not plain YAML (option: value lines): {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise CLIError(f"--config {p} must be a mapping of option: value, got {type(cfg).__name__}")
    return cfg


def _value_problem(action: argparse.Action, value) -> str | None:
    """What a yaml value for ``action`` must be, when it is not that (``None``: it fits); ``null`` = not given."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or (
            isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool)):
        return None if isinstance(value, bool) else "true or false"
    if action.nargs in ("*", "+", argparse.REMAINDER):
        return None if isinstance(value, list) and all(isinstance(x, str) for x in value) else "a list of strings"
    if action.type in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if action.type is int:
            ok = ok and isinstance(value, int)
        return None if ok else ("a whole number" if action.type is int else "a number")
    if action.type is None or action.type is str or callable(action.type):
        if not isinstance(value, str):
            return "text (a name or a path)" if action.type is None or action.type is str else "text"
    if action.choices is not None and value not in action.choices:
        return f"one of {list(action.choices)}"
    return None


def parse(argv: list[str]) -> argparse.Namespace:
    """The options of ``argv``, with ``--config FILE.yaml``'s values as defaults (flags given win).

    Raises ``CLIError`` for an unreadable config, an unknown or renamed option in it, or an earlier flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        cfg = read_yaml(cfg_path)
        subparsers = parser.commands
        # one yaml may serve the whole pipeline: options of other sub-commands are ignored, typos are not
        actions = {a.dest: a for sp in subparsers.values() for a in sp._actions}
        cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
        renamed = [RENAMED[f"--{k.replace('_', '-')}"] for k in cfg
                   if k not in actions and f"--{k.replace('_', '-')}" in RENAMED]
        if renamed:
            raise CLIError(f"config {cfg_path}: " + "; ".join(renamed))
        unknown = [k for k in cfg if k not in actions or k.startswith("_")]
        if unknown:
            raise CLIError(f"config {cfg_path}: unknown options {unknown}")
        for k, v in cfg.items():  # "1e-3" is a string to YAML 1.1: convert as the flag would
            kind = actions[k].type
            if isinstance(v, str) and kind in (int, float):
                try:
                    cfg[k] = kind(v)
                except ValueError:
                    raise CLIError(f"config {cfg_path}: {k} must be a number, got {v!r}") from None
        wrong = [f"{k} must be {want}, got {v!r}" for k, v in cfg.items()
                 if (want := _value_problem(actions[k], v)) is not None]
        if wrong:  # what the flag's parser would have refused (data: 5 is no path)
            raise CLIError(f"config {cfg_path}: " + "; ".join(wrong))
        known = set(vars(args))
        subparsers[args.command].set_defaults(**{k: v for k, v in cfg.items() if k in known})
        args = parser.parse_args(argv)
    return args
