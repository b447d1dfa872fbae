"""``gram-plugin`` command line: meta-train | tune | eval | inspect | demo (+ chc, build-proxy).

Every command writes into one run folder (``--out``): ``config.yaml``, ``log.txt``,
``metrics.json``, artefacts (``init.safetensors``, ``prompt.safetensors``) and ``accuracy.png``;
meta-train also keeps checkpoints in ``meta/`` (``--resume`` continues from them). Options may come
from ``--config file.yaml`` (keys = option names with ``_``); flags given on the command line win.
Defaults come from the config dataclasses (``MetaConfig``, ``TuneConfig``, ``PromptConfig``,
``DataConfig``); ``demo`` alone uses the quicker ``DEMO_SETTINGS``. Every option is checked, and an
existing init file read, before anything is loaded or written; a non-empty run folder is refused
unless ``--resume`` or ``--overwrite`` is given, and a run holds a lock on its folder while it writes.
"""

from __future__ import annotations

import importlib
import sys

from .options import DEMO_SETTINGS, CLIError, DataConfig
from .parser import _apply_yaml, build_parser
from .pipeline import prepare_data
from .plan import Plan, plan
from .run_folder import Run

__all__ = ["main", "build_parser", "plan", "Plan", "Run", "CLIError", "DataConfig", "DEMO_SETTINGS", "prepare_data"]


def _dispatch(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(f"gram_plugin.{module}")
    except ImportError as e:
        raise CLIError(f"gram_plugin.{module} is not available ({e})") from None
    fn = getattr(mod, "cli_main", None)
    if fn is None:
        raise CLIError(f"gram_plugin.{module} has no cli_main(argv)")
    return int(fn(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "meta-train" and any(a.split("=")[0] == "--dassl-config" for a in argv[1:]):
            return _dispatch("adapters.meta_command", argv[1:])  # through the user's own Dassl trainer
        if argv and argv[0] == "chc":
            return _dispatch("chc", argv[1:])
        if argv and argv[0] == "build-proxy":
            return _dispatch("proxy_build", argv[1:])
        parser = build_parser()
        args = _apply_yaml(parser, argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that installs it
        from ..extras import missing_extra_message

        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"gram-plugin: error: {message}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, RuntimeError, OSError) as e:
        print(f"gram-plugin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
