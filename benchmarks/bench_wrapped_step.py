"""Cost of the plug-in on a Dassl-style training step: plain vs wrapped (regulator) vs wrapped (ProGrad).

The trainer is the Dassl CoOp replica of ``tests/fixtures/dassl_like.py`` (Dassl's ``TrainerX`` and
CoOp's ``CustomCLIP`` / ``PromptLearner`` / ``TextEncoder``, fp32 path through
``model_backward_and_update``, SGD with momentum) on an open_clip CLIP with random weights, by
default ViT-B-32 at 224 px (text tower width 512, 12 layers, 77 tokens; image tower ViT-B/32).
``CTX_INIT "a photo of a"`` so that the CoOp adapter has a zero-shot teacher for ProGrad.

Variants (each its own trainer over the same frozen CLIP object, same batch):
  plain      ``trainer.forward_backward(batch)`` of the unwrapped trainer
  regulated  ``wrap(trainer, regulator=GradientRegulator(...))``: the regulated step, installed as an
             optimiser step pre-hook (full-rank head, width 512)
  prograd    ``wrap(trainer, regulator=None, prograd=1.0)``: ProGrad as shipped for CoOp, G_g taken
             from the trainer's own forward (a forward hook on ``trainer.model`` differentiates the KL
             with ``retain_graph=True``; the teacher reuses that forward's image features)
  prograd+reg  both (``chain(prograd, regulate)``)
  prograd-2fwd  the same with the adapter's two-forward fallback (what adapters whose model returns
             the loss while training use: an extra prompted forward + KL gradient before the
             trainer's own step). Its prompts are checked to end equal to ``prograd``'s.
  upstream   ProGrad's own trainer (the fixture's replica of BeierZhu/Prompt-align
             ``trainers/prograd.py``: one forward, two backwards, separate zero-shot CLIP), for
             reference; not wrapped

All variants run round-robin ``--repeats`` times in one process after one warm-up each; the
figures are medians, so every ratio compares runs made side by side under the same load. Wall-clock
and process CPU time (``time.process_time``) are both recorded; on a shared machine the CPU time of a
single-threaded run (``--threads 1``) is the steadier measure.

    python3 benchmarks/bench_wrapped_step.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/fixtures/dassl_like.py (and its conftest import)
sys.path.insert(0, str(REPO))

from fixtures import dassl_like as D  # noqa: E402

from gram_plugin.adapters import wrap  # noqa: E402
from gram_plugin.regulator import GradientRegulator  # noqa: E402
from timing import interleaved, medians  # noqa: E402  (benchmarks/timing.py)

VARIANTS = ("plain", "regulated", "prograd", "prograd+reg", "prograd-2fwd", "upstream")

CLASSNAMES = [
    "airplane", "car_side", "chandelier", "face", "ketch", "leopard", "motorbike", "pizza", "sunflower",
    "watch", "golden_retriever", "tabby_cat", "red_fox", "sports_car", "coffee_mug", "pineapple",
    "violin", "lighthouse", "umbrella", "strawberry",
]


def build_clip(args):
    if args.model == "tiny":
        from conftest import make_tiny_clip

        return make_tiny_clip(0, image_size=args.image_size)
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended
    torch.manual_seed(0)
    return open_clip.create_model(args.model, force_image_size=args.image_size).eval()


def make_trainers(args, variants):
    clip = build_clip(args)
    names = [f"{CLASSNAMES[i % len(CLASSNAMES)]}_{i // len(CLASSNAMES)}".removesuffix("_0") for i in range(args.classes)]
    trainers = {}
    for v in variants:
        cls = D.ProGrad if v == "upstream" else D.CoOp
        cfg = D.make_cfg("ProGrad" if v == "upstream" else "CoOp", n_ctx=4, ctx_init="a photo of a", prec="fp32")
        torch.manual_seed(1)
        t = cls(cfg, names, lambda: clip)  # one frozen CLIP object shared by all trainers
        t.num_batches = 10 ** 9  # no lr-scheduler step inside the timed loop
        if v == "regulated":
            wrap(t, regulator=GradientRegulator({"prompt_learner.ctx": tuple(t.model.prompt_learner.ctx.shape)}))
        elif v == "prograd":
            wrap(t, regulator=None, prograd=1.0)
        elif v == "prograd-2fwd":
            from gram_plugin.adapters.trainers.coop import CoOpAdapter

            adapter = CoOpAdapter(t)
            adapter.logits_from_own_forward = False
            wrap(t, regulator=None, prograd=1.0, adapter=adapter)
        elif v == "prograd+reg":
            wrap(t, regulator=GradientRegulator({"prompt_learner.ctx": tuple(t.model.prompt_learner.ctx.shape)}),
                 prograd=1.0)
        trainers[v] = t
    g = torch.Generator().manual_seed(0)
    batch = {"img": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
             "label": torch.randint(0, args.classes, (args.batch,), generator=g)}
    return trainers, batch, clip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights) or 'tiny'")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if "plain" not in variants:
        raise SystemExit("--variants must include plain (the reference)")
    trainers, batch, clip = make_trainers(args, variants)
    for v in variants:  # warm-up (lazy allocations; the teacher's text features are computed once here)
        trainers[v].forward_backward(batch)
    times, cpu = interleaved({v: (lambda t=trainers[v]: t.forward_backward(batch)) for v in variants},
                             args.repeats, digits=3)
    check = {}
    for a, b in (("prograd-2fwd", "prograd"), ("prograd", "regulated"), ("regulated", "plain")):
        if a in trainers and b in trainers:
            ca, cb = (trainers[x].model.prompt_learner.ctx.detach() for x in (a, b))
            check[f"{a} vs {b}"] = float((ca - cb).abs().max())
    print("max |ctx difference| after all steps (same batches): "
          + ", ".join(f"{k}: {v:.2e}" for k, v in check.items()), flush=True)
    hook_ms = None
    if "regulated" in trainers:  # the regulated step's own cost: the pre-step hook alone, many calls
        t = trainers["regulated"]
        hook = t._gram_wrap.hooks[0]
        saved = t.model.prompt_learner.ctx.grad.clone()
        c0, n = time.process_time(), 200
        for _ in range(n):
            hook._pre_step(t.optim, (), {})
        hook_ms = 1000 * (time.process_time() - c0) / n
        t.model.prompt_learner.ctx.grad.copy_(saved)
    med, med_cpu = medians(times), medians(cpu)
    # per-round ratios too: their median is robust to load changing between rounds
    per_round = {v: statistics.median(a / b for a, b in zip(times[v], times["plain"])) for v in variants if v != "plain"}
    text = clip.transformer.width if hasattr(clip.transformer, "width") else None
    print(f"\nmodel={args.model} image_size={args.image_size} text_width={text} classes={args.classes} "
          f"batch={args.batch} repeats={args.repeats} threads={args.threads} torch={torch.__version__}")
    print(f"{'variant':12s} {'median s':>9s} {'/plain (medians)':>17s} {'/plain (per round)':>19s} "
          f"{'cpu s':>8s} {'cpu /plain':>10s}")
    for v in variants:
        print(f"{v:12s} {med[v]:9.3f} {med[v] / med['plain']:17.3f} {per_round.get(v, 1.0):19.3f} "
              f"{med_cpu[v]:8.3f} {med_cpu[v] / med_cpu['plain']:10.3f}")
    if hook_ms is not None:
        print(f"regulated pre-step hook alone: {hook_ms:.3f} ms CPU per step = "
              f"{hook_ms / 1000 / med_cpu['plain']:.2%} of the plain step's CPU time")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "cpu": cpu, "median": med,
                                               "median_cpu": med_cpu,
                                               "cpu_ratio": {v: med_cpu[v] / med_cpu["plain"] for v in variants},
                                               "ratio_of_medians": {v: med[v] / med["plain"] for v in variants},
                                               "median_of_ratios": per_round, "ctx_checks": check,
                                               "hook_ms_cpu": hook_ms}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
