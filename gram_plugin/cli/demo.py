"""``gram-plugin demo``: meta-train GRAM on base classes, tune with and without it, compare with zero-shot and CoOp."""

from __future__ import annotations

import time

from .options import DEMO_SETTINGS, add_meta, add_shots, add_standalone_command, add_tasks, add_tuning
from .pipeline import build_model, command, meta_curve, meta_train, table, tune_and_eval


def add_parser(sub) -> None:
    """Add ``demo`` and its flags to the sub-parsers ``sub``."""
    p = add_standalone_command(sub, "demo", help="meta-train GRAM on base classes, tune, compare with CoOp on base/new/H")
    add_shots(p)
    add_tuning(p)
    add_tasks(p)
    add_meta(p)
    p.set_defaults(func=cmd_demo, **DEMO_SETTINGS)


def cmd_demo(args) -> int:
    """Zero-shot, CoOp and CoOp+GRAM on base / new / H into one run folder (metrics.json, accuracy.png)."""
    t0 = time.perf_counter()
    with command(args) as (p, backbone, data, run):
        from ..finetune import evaluate_base_new

        # the handcrafted prompt ("a photo of a {class}."), untuned: what tuning should not lose on new classes
        zero_shot = evaluate_base_new(build_model(p, backbone, args.seed), data["base_test"], data["new_test"],
                                      data["all_test"])
        init, meta_hist = meta_train(args, p, backbone, data, run, method="gram")
        _, gram_hist, gram_final, gram_prompt = tune_and_eval(args, p, backbone, data, run, init=init, label="gram")
        _, coop_hist, coop_final, _ = tune_and_eval(args, p, backbone, data, run, init=None, label="coop")
        init.save(run.path("init.safetensors"), overwrite=True)
        gram_prompt.save(run.path("prompt.safetensors"), overwrite=True)
        results = table({"zero-shot": zero_shot, "CoOp": coop_final, "CoOp+GRAM": gram_final})
        print(results)
        run.log("results (accuracy %, held-out images):\n" + results)
        metrics = {"final": {"zero-shot": zero_shot, "coop": coop_final, "coop+gram": gram_final},
                   "per_epoch": {"coop": coop_hist, "coop+gram": gram_hist},
                   "meta_train": meta_curve(meta_hist),
                   "backbone": backbone.name, "data": p.data.data, "seconds": time.perf_counter() - t0}
        run.write_metrics(metrics)
        run.plot({"CoOp base": [r["base"] for r in coop_hist], "CoOp new": [r["new"] for r in coop_hist],
                  "CoOp+GRAM base": [r["base"] for r in gram_hist], "CoOp+GRAM new": [r["new"] for r in gram_hist]},
                 title=f"base-to-new on {p.data.data} ({backbone.name})")
        run.log(f"wrote {run.path('metrics.json')} and {run.path('accuracy.png')} in {time.perf_counter() - t0:.1f}s")
    return 0
