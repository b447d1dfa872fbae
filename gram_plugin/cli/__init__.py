"""``gram-plugin`` command line: meta-train | tune | eval | inspect | demo | chc | compare.

One module per command (``demo``, ``meta_train`` with its Dassl path in ``dassl``, ``tune``, ``eval``,
``inspect``, ``chc``, ``compare``), each adding its own parser; what they share: ``options`` (flags, the
CLI's config dataclasses, ``CLIError``), ``plan`` (every option checked before anything is loaded),
``run_folder`` (``--out``), ``pipeline`` (the standalone path's steps), ``parser`` (the parser and
``--config`` yaml).

Every command but ``inspect`` and ``compare`` writes into one run folder (``--out``): ``config.yaml``,
``log.txt``, ``metrics.json``, artefacts (``init.safetensors``, ``prompt.safetensors``) and
``accuracy.png``; meta-train also keeps checkpoints in ``meta/`` (``--resume`` continues from them). Options
may come from ``--config file.yaml`` (keys = option names with ``_``); flags given on the command line win.
A non-empty run folder is refused unless ``--resume`` or ``--overwrite`` is given, and a run holds a lock on
its folder while it writes. Errors gram-plugin raises on purpose
(:class:`~gram_plugin.errors.GramPluginError`) and ``OSError`` print one line (exit status 2; ``--debug``
shows the traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from ..errors import GramPluginError
from .options import DEMO_SETTINGS, CLIError, DasslConfig, DataConfig, TaskConfig
from .parser import build_parser, parse
from .pipeline import prepare_data
from .plan import Plan, plan
from .run_folder import Run

__all__ = ["main", "build_parser", "parse", "plan", "Plan", "Run", "CLIError", "DataConfig", "TaskConfig",
           "DasslConfig", "DEMO_SETTINGS", "prepare_data"]

# commands that left the installed package -> where they live now
MOVED = {"build-proxy": "build-proxy is a build script of the checkout now: python tools/build_proxy.py --out DIR "
                        "(from a gram-plugin checkout; the build it makes by default ships in gram_plugin/assets/proxy)"}


def main(argv: list[str] | None = None) -> int:
    """Run ``gram-plugin ARGV``; returns the exit status (0; 2 after printing one error line; 130 after Ctrl-C).

    ``GramPluginError`` and ``OSError`` (and an optional dependency that is not installed) print one
    line, or their traceback with ``--debug``; so does Ctrl-C (meta-train saves a checkpoint first, which
    ``--resume`` continues from); any other exception is a bug and propagates."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv and argv[0] in MOVED:
            raise CLIError(MOVED[argv[0]])
        args = parse(argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that installs it
        from ..extras import missing_extra_message

        message = missing_extra_message(e)
        if message is None or debug:
            raise
        print(f"gram-plugin: error: {message}", file=sys.stderr)
        return 2
    except (GramPluginError, OSError) as e:
        if debug:
            raise
        print(f"gram-plugin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not a traceback (the run's log says "interrupted")
        if debug:
            raise
        from ..meta import MetaTrainingInterrupted

        how = (f": {e}; run the same command with --resume to continue" if isinstance(e, MetaTrainingInterrupted)
               and "checkpoint" in str(e) and "saved" in str(e) else (f": {e}" if str(e) else ""))
        print(f"gram-plugin: interrupted{how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
