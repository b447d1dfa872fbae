"""``gram-plugin tune``: prompt-tune on base classes (optionally from an init), evaluate base/new/H."""

from __future__ import annotations

from ..config import TuneConfig
from .options import add_shots, add_standalone_command, add_tuning, default
from .pipeline import command, table, tune_and_eval


PARTIAL_PROMPT = "prompt.partial.safetensors"  # the prompt learned until Ctrl-C stopped the tuning


def add_parser(sub) -> None:
    """Add ``tune`` and its flags to the sub-parsers ``sub``."""
    p = add_standalone_command(sub, "tune", help="prompt-tune on base classes (optionally from an init), evaluate base/new/H")
    add_shots(p)
    add_tuning(p)
    p.add_argument("--init", default=None, help="init.safetensors from meta-train (OUT/init.safetensors)")
    p.add_argument("--prograd", type=float, default=default(TuneConfig, "prograd_lambda"),
                   help="ProGrad lambda in [0, 1] (off unless given)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    """Tune, evaluate each epoch, write prompt.safetensors, metrics.json and accuracy.png (on Ctrl-C: the prompt
    learned so far as prompt.partial.safetensors, and metrics.json marking the run interrupted)."""
    with command(args) as (p, backbone, data, run):
        _, hist, final, prompt = tune_and_eval(args, p, backbone, data, run, init=p.init,
                                               label="gram" if p.init else "coop", partial=PARTIAL_PROMPT)
        prompt.save(run.path("prompt.safetensors"), overwrite=True)
        run.write_metrics({"final": final, "per_epoch": hist})
        run.plot({"base": [r["base"] for r in hist], "new": [r["new"] for r in hist]}, title="tune")
    print(table({"tuned": final}))
    return 0
