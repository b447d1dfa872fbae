"""``gram-plugin eval``: evaluate a prompt file on base / new / all classes."""

from __future__ import annotations

from .options import add_standalone_command
from .pipeline import build_model, command, table


def add_parser(sub) -> None:
    """Add ``eval`` and its flags to the sub-parsers ``sub``."""
    p = add_standalone_command(sub, "eval", help="evaluate a prompt (prompt.safetensors) on base/new/all")
    p.add_argument("--prompt", default=None, help="prompt.safetensors (none = the initial prompt)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    """Accuracy of the prompt on base / new / all test images into metrics.json."""
    with command(args) as (p, backbone, data, run):
        from ..finetune import evaluate_base_new  # torch: after the plan's checks

        model = build_model(p, backbone, args.seed)
        if p.init is not None:
            p.init.apply_to(model, backbone=backbone.name, strict=True)
        final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
        run.write_metrics({"final": final})
    print(table({"eval": final}))
    return 0
