"""``gram-plugin inspect``: print what an init / prompt file holds."""

from __future__ import annotations

import json


def cmd_inspect(args) -> int:
    from ..prompts import PromptInit

    init = PromptInit.load(args.path)
    print(json.dumps(init.describe(), indent=2, default=str))
    return 0
