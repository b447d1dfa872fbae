"""``gram-plugin tune``: prompt-tune on base classes (optionally from an init), evaluate base/new/H."""

from __future__ import annotations

from .pipeline import _command, _table, tune_and_eval


def cmd_tune(args) -> int:
    with _command(args) as (p, backbone, data, run):
        _, hist, final, prompt = tune_and_eval(args, p, backbone, data, run, init=p.init,
                                               label="gram" if p.init else "coop")
        prompt.save(run.path("prompt.safetensors"), overwrite=True)
        run.write_metrics({"final": final, "per_epoch": hist})
        run.plot({"base": [r["base"] for r in hist], "new": [r["new"] for r in hist]}, title="tune")
    print(_table({"tuned": final}))
    return 0
