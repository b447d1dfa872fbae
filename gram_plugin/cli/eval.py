"""``gram-plugin eval``: evaluate a prompt file on base / new / all classes."""

from __future__ import annotations

from .pipeline import _command, _table, build_model


def cmd_eval(args) -> int:
    from ..finetune import evaluate_base_new

    with _command(args) as (p, backbone, data, run):
        model = build_model(p, backbone, args.seed)
        if p.init is not None:
            p.init.apply_to(model, backbone=backbone.name, strict=True)
        final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
        run.write_metrics({"final": final})
    print(_table({"eval": final}))
    return 0
