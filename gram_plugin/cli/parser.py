"""The parser of every command, and ``--config file.yaml`` read into it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .demo import cmd_demo
from .eval import cmd_eval
from .inspect import cmd_inspect
from .meta_train import cmd_meta_train
from .options import DEMO_SETTINGS, CLIError, _common, _default, _meta, _tuning
from .tune import cmd_tune
from ..finetune import TuneConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gram-plugin", description="gram-plugin command line: meta-train | tune | eval | inspect | demo (+ chc, build-proxy).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="meta-train GRAM on base classes, tune, compare with CoOp on base/new/H")
    _common(p)
    _tuning(p)
    _meta(p)
    p.set_defaults(func=cmd_demo, **DEMO_SETTINGS)
    p = sub.add_parser("meta-train", help="meta-learn a prompt init (+ regulator) -> init.safetensors; with "
                       "--dassl-config: through your own Dassl trainer (gram-plugin meta-train --dassl-config X -h)")
    _common(p)
    _meta(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_meta_train)
    p = sub.add_parser("tune", help="prompt-tune on base classes (optionally from an init), evaluate base/new/H")
    _common(p)
    _tuning(p)
    p.add_argument("--init", default=None, help="init.safetensors from meta-train")
    p.add_argument("--prograd", type=float, default=_default(TuneConfig, "prograd_lambda"),
                   help="ProGrad lambda in [0, 1] (off unless given)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("eval", help="evaluate a prompt (prompt.safetensors) on base/new/all")
    _common(p)
    p.add_argument("--prompt", default=None, help="prompt.safetensors (none = the initial prompt)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("inspect", help="print what an init / prompt file holds")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)
    return parser



def _read_yaml(path: str) -> dict:
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


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        cfg = _read_yaml(cfg_path)
        subparsers = parser._subparsers._group_actions[0].choices
        # one yaml may serve the whole pipeline: options of other sub-commands are ignored, typos are not
        actions = {a.dest: a for sp in subparsers.values() for a in sp._actions}
        cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
        unknown = [k for k in cfg if k not in actions]
        if unknown:
            raise CLIError(f"config {cfg_path}: unknown options {unknown}")
        for k, v in cfg.items():  # "1e-3" is a string to YAML 1.1: convert as the flag would
            kind = actions[k].type
            if isinstance(v, str) and kind in (int, float):
                try:
                    cfg[k] = kind(v)
                except ValueError:
                    raise CLIError(f"config {cfg_path}: {k} must be a number, got {v!r}") from None
        known = set(vars(args))
        subparsers[args.command].set_defaults(**{k: v for k, v in cfg.items() if k in known})
        args = parser.parse_args(argv)
    return args
