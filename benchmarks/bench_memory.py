"""Peak memory of one second-order meta-step vs classes and inner steps: plain, class chunking,
inner-step checkpointing, both.

Model: PromptedCLIP (CoOp context, 4 tokens, random init) over a small randomly initialised
open_clip CLIP whose text tower keeps CLIP's real layout and 77-token context but is narrow and
shallow so that 1000-class tasks run on a small CPU (default: text width 64, 2 heads, 2 layers,
embed dim 64; the image side is given as precomputed features, as with the feature cache). One
task per meta-step (the trainer frees each task's graph before building the next, so the peak is
one task's), 1 support and 1 query example per class, MAML second order (MetaPromptTrainer
.outer_step, no regulator unless --regulator).

Configurations:
  plain   MetaConfig() as is
  chunk   ``with class_chunking(model.backbone, --chunk)``: text tower --chunk classes at a time
  ckpt    MetaConfig(checkpoint_inner=True): no inner-step graph kept, recomputed in the meta-backward
  both    chunk + ckpt

Memory: every configuration runs once in a fresh subprocess; the figure is the peak resident set
size during the step minus the resident size right before it (Linux VmHWM, reset through
/proc/self/clear_refs), with glibc told to serve blocks >= 64 KiB by mmap so that freed memory
leaves the RSS. This is *process* memory (torch CPU tensors, autograd buffers, allocator slack), not
a tensor-only count. A subprocess gets an address-space limit (--cap-gb above its size at start);
a run that hits it is reported as "> cap" (it does not fit in that much memory).

Time (--time): the four configurations at one size, interleaved round-robin in one process,
median of --repeats (wall-clock and process CPU time); ratios against plain give the recomputation
cost. The "seconds" column of the memory grid is one first call per fresh process with mmap'd
malloc (page faults on every large allocation): not a timing, use --time.

    python3 benchmarks/bench_memory.py                       # the default grid (7 min here, 1 thread)
    python3 benchmarks/bench_memory.py --time --classes 100 --k 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task  # noqa: E402
from gram_plugin.scale import class_chunking  # noqa: E402
from timing import interleaved, medians  # noqa: E402  (benchmarks/timing.py)

CONFIGS = ("plain", "chunk", "ckpt", "both")
WORDS = ["apple", "bridge", "castle", "dolphin", "engine", "forest", "guitar", "harbor", "island", "jacket",
         "kettle", "lemon", "mountain", "needle", "orchid", "parrot", "quilt", "river", "saddle", "tiger"]


def build(args, classes):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from gram_plugin.backbones import OpenCLIPBackbone
    from gram_plugin.models import PromptedCLIP

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    clip = CLIP(embed_dim=args.width,
                vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=32),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=args.width, heads=args.heads,
                                     layers=args.layers))
    backbone = OpenCLIPBackbone(clip.eval())
    model = PromptedCLIP(backbone, "coop", n_ctx=4, ctx_init=None)
    names = [f"{WORDS[i % 20]} {WORDS[(i // 20) % 20]} {i // 400}" for i in range(classes)]
    g = torch.Generator().manual_seed(1)

    def batch():
        return {"features": torch.randn(classes, backbone.embed_dim, generator=g),
                "labels": torch.arange(classes), "classnames": names}

    task = Task(batch(), batch())
    return model, task


def make_step(config, model, task, args, k):
    cfg = MetaConfig(inner_lr=0.002, inner_steps=k, meta_batch_size=1, progress=False,
                     checkpoint_inner=config in ("ckpt", "both"))
    reg = GradientRegulator.for_module(model) if args.regulator else None
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg)
    chunk = config in ("chunk", "both")

    def step():
        if chunk:
            with class_chunking(model.backbone, args.chunk):
                return trainer.outer_step([task])
        return trainer.outer_step([task])

    return step


def _status(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(args):
    model, task = build(args, args.classes)
    step = make_step(args.child, model, task, args, args.k)
    model.set_classnames(task.support["classnames"])  # token buffers built before the baseline
    cap = int(args.cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + cap, resource.RLIM_INFINITY))
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    t0 = time.perf_counter()
    try:
        step()
        ok = True
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        ok = False
    seconds = time.perf_counter() - t0
    print(json.dumps({"ok": ok, "peak_bytes": _status("VmHWM") - base, "seconds": seconds}))


def run_child(config, classes, k, args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    argv = [sys.executable, __file__, "--child", config, "--classes-one", str(classes), "--k-one", str(k),
            "--width", str(args.width), "--heads", str(args.heads), "--layers", str(args.layers),
            "--chunk", str(args.chunk), "--cap-gb", str(args.cap_gb), "--threads", str(args.threads)]
    if args.regulator:
        argv.append("--regulator")
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        return {"ok": False, "peak_bytes": None, "seconds": None, "error": " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(r):
    if r.get("error"):
        return f"{'crash':>9s}"
    if not r["ok"]:
        return f"{'> cap':>9s}"
    return f"{r['peak_bytes'] / 2**20:9.0f}"


def grid(args):
    rows = []  # (classes, k)
    for c in args.classes_list:
        rows.append((c, args.k_for_classes))
    for k in args.k_list:
        if (args.classes_for_k, k) not in rows:
            rows.append((args.classes_for_k, k))
    results = {}
    print(f"peak RSS growth (MiB) of one second-order meta-step; text tower width={args.width} heads={args.heads} "
          f"layers={args.layers} ctx=77, n_ctx=4, chunk={args.chunk}, cap={args.cap_gb} GiB, threads={args.threads}, "
          f"regulator={args.regulator}, torch={torch.__version__}", flush=True)
    print(f"{'classes':>7s} {'k':>2s} " + " ".join(f"{c:>9s}" for c in args.configs) + "   seconds (" + "/".join(args.configs) + ")", flush=True)
    for classes, k in rows:
        res = {c: run_child(c, classes, k, args) for c in args.configs}
        results[f"{classes}x{k}"] = res
        secs = "/".join("-" if r.get("seconds") is None else f"{r['seconds']:.1f}" for r in res.values())
        print(f"{classes:7d} {k:2d} " + " ".join(fmt(res[c]) for c in args.configs) + f"   {secs}", flush=True)
        for c, r in res.items():
            if r.get("error"):
                print(f"    {c}: {r['error']}", flush=True)
    return results


def timing(args):
    torch.set_num_threads(args.threads)
    model, task = build(args, args.classes)
    steps = {c: make_step(c, model, task, args, args.k) for c in args.configs}
    for c in args.configs:
        steps[c]()
    times, cpu = interleaved({c: steps[c] for c in args.configs}, args.repeats)
    med, med_cpu = medians(times), medians(cpu)
    print(f"\nclasses={args.classes} k={args.k} width={args.width} layers={args.layers} chunk={args.chunk} "
          f"threads={args.threads}")
    for c in args.configs:
        print(f"{c:6s} median {med[c]:.2f}s  /plain {med[c] / med['plain']:.3f}   "
              f"cpu {med_cpu[c]:.2f}s  /plain {med_cpu[c] / med_cpu['plain']:.3f}")
    return {"times": times, "cpu": cpu, "median": med, "median_cpu": med_cpu,
            "ratios": {c: med[c] / med["plain"] for c in args.configs},
            "cpu_ratios": {c: med_cpu[c] / med_cpu["plain"] for c in args.configs}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes-list", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 250, 1000])
    p.add_argument("--k-for-classes", type=int, default=1, help="inner steps of the classes sweep")
    p.add_argument("--k-list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--classes-for-k", type=int, default=100, help="classes of the k sweep")
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS))
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk", type=int, default=50, help="classes per chunk")
    p.add_argument("--cap-gb", type=float, default=6.0, help="address-space limit above the child's start size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--regulator", action="store_true", help="GRAM (learned regulator) instead of plain MAML")
    p.add_argument("--time", action="store_true", help="interleaved timing of the configurations at --classes/--k")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--classes-one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--k-one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        args.classes, args.k = args.classes_one, args.k_one
        child(args)
        return 0
    out = timing(args) if args.time else grid(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
