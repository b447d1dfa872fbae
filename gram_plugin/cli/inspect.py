"""``gram-plugin inspect``: print what an init / prompt file holds."""

from __future__ import annotations

import json

from ..paths import file_problem
from .options import CLIError


def add_parser(sub) -> None:
    """Add ``inspect`` to the sub-parsers ``sub``."""
    p = sub.add_parser("inspect", help="print what an init / prompt file holds")
    p.add_argument("path")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    """Print the file's description (method, shapes, metadata) as JSON."""
    missing = file_problem(args.path, "init file")  # at once, not after importing torch
    if missing:
        raise CLIError(missing)
    from ..prompts import PromptInit

    init = PromptInit.load(args.path)
    print(json.dumps(init.describe(), indent=2, default=str))
    return 0
