"""Meta-step cost: MetaPromptTrainer vs the plain prompt-tuning steps it unrolls, and vs `higher`.

Model: open_clip ViT-B-32 built without pretrained weights (text tower width 512, 12 layers,
77-token context), CoOp context prompts (random init) over each task's class names, image side
given as precomputed random features (the frozen image tower is not part of the meta-step).

Variants, all on the same meta-batch of ``--tasks`` tasks:
  plain   (k+1) plain prompt-tuning steps per task (k on the support, 1 on the query): forward,
          backward, SGD step on the context; the cost the meta-step unrolls
  meta2   MetaPromptTrainer.outer_step, second order (MAML)
  meta1   MetaPromptTrainer.outer_step, first order (FOMAML)
  higher2 the same second-order step written with `higher` (innerloop_ctx + differentiable SGD,
          then backward of the adapted query loss and an Adam step)
  gram2   meta2 with a GradientRegulator (GRAM), for reference
  meta2b  meta2 with MetaConfig(batch_tasks=True, checkpoint_inner=False): the meta-batch's tasks
          through one text forward per inner step (gram_plugin.metabatch), every inner step's graph
          kept (the default before issue 26); gram2b likewise for gram2
  metad   MetaConfig's defaults (second order): what a user gets; since issue 26 the batched step with
          checkpoint_inner="auto" (gram_plugin.metabatch: inner graphs kept up to a memory budget, the
          others recomputed in the meta-backward)

Times: the variants run round-robin ``--repeats`` times in one process and the median is taken,
so every ratio compares runs made side by side. Both wall-clock time and the process CPU time
(``time.process_time``) are recorded; on a shared machine whose load changes during a round, the CPU
time of a single-threaded run (``--threads 1``) is the steadier measure of the work a variant does.
Peak memory: each variant runs once in a fresh subprocess; the figure is the peak resident set size (Linux VmHWM, reset via
/proc/self/clear_refs right before the step) minus the resident size before the step, with glibc
told to serve big blocks by mmap (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the RSS.

    python3 benchmarks/bench_meta_step.py --classes 4 --k 1 --tasks 4 --repeats 3
    python3 benchmarks/bench_meta_step.py --classes 16 --k 1,2,3,4 --variants plain,meta2,meta2b,metad,higher2

On a GPU (``--device cuda``) every timed call ends with ``torch.cuda.synchronize()`` and the peak
memory is CUDA's (``torch.cuda.max_memory_allocated`` during one step, minus the allocation before
it), measured in this process. ``--model ViT-B-16`` has the same text tower as ViT-B-32 (width 512,
12 layers); only the image tower differs, and it is not part of the meta-step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task  # noqa: E402
from timing import interleaved, medians  # noqa: E402  (benchmarks/timing.py)

VARIANTS = ("plain", "meta2", "meta2b", "metad", "meta1", "higher2", "gram2", "gram2b")
# MetaConfig fields per trainer variant (metad: none, the defaults)
TRAINER_VARIANTS = {
    "meta2": {"batch_tasks": False, "checkpoint_inner": False},
    "meta1": {"batch_tasks": False, "checkpoint_inner": False, "first_order": True},
    "gram2": {"batch_tasks": False, "checkpoint_inner": False},
    "meta2b": {"batch_tasks": True, "checkpoint_inner": False},
    "gram2b": {"batch_tasks": True, "checkpoint_inner": False},
    "metad": {},
}

CLASSNAMES = [
    "airplane", "car side", "chandelier", "face", "ketch", "leopard", "motorbike", "pizza", "sunflower",
    "watch", "golden retriever", "tabby cat", "red fox", "sports car", "coffee mug", "pineapple",
    "violin", "lighthouse", "umbrella", "strawberry",
]


def build(args):
    import logging

    import open_clip

    from gram_plugin.backbones import OpenCLIPBackbone, tiny_openclip
    from gram_plugin.models import PromptedCLIP

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" is intended here
    torch.manual_seed(0)
    if args.model == "tiny":  # a small random CLIP, for quick dry runs of this script
        backbone = tiny_openclip()
    elif args.model.startswith("proxy"):  # the CLI's default backbone (MiniLM text tower)
        from gram_plugin.backbones import build_backbone

        backbone = build_backbone(args.model)
    else:
        backbone = OpenCLIPBackbone(open_clip.create_model(args.model))
    model = PromptedCLIP(backbone, "coop", n_ctx=args.n_ctx, ctx_init=None).to(args.device)
    g = torch.Generator().manual_seed(1)
    names = [f"{CLASSNAMES[i % len(CLASSNAMES)]} {i // len(CLASSNAMES)}".strip(" 0") for i in range(max(args.classes * 2, 20))]
    tasks = []
    for _ in range(args.tasks):
        pick = torch.randperm(len(names), generator=g)[: args.classes].tolist()
        cls = [names[i] for i in pick]

        def batch(n):
            labels = torch.arange(n) % args.classes
            feats = torch.randn(n, backbone.embed_dim, generator=g)
            return {"features": feats.to(args.device), "labels": labels.to(args.device), "classnames": cls}

        tasks.append(Task(batch(args.shots * args.classes), batch(args.shots * args.classes)))
    return model, tasks


def make_variant(name, model, tasks, args):
    if name in TRAINER_VARIANTS:
        cfg = MetaConfig(inner_lr=0.002, inner_steps=args.k, meta_batch_size=len(tasks), progress=False,
                         **TRAINER_VARIANTS[name])
        reg = GradientRegulator({"ctx": tuple(model.ctx.shape)}) if name.startswith("gram") else None
        trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg)

        def meta():
            trainer.outer_step(tasks)

        meta.meta_step = trainer.meta_step  # to read what checkpoint_inner="auto" chose
        return meta
    if name == "plain":
        opt = torch.optim.SGD([model.ctx], lr=0.002)

        def plain():
            for task in tasks:
                for j in range(args.k + 1):
                    opt.zero_grad(set_to_none=True)
                    model.loss(task.support if j < args.k else task.query).backward()
                    opt.step()

        return plain
    if name == "higher2":
        import higher
        from torch.nn.attention import SDPBackend, sdpa_kernel

        outer = torch.optim.Adam([model.ctx], lr=1e-3)
        inner = torch.optim.SGD([model.ctx], lr=0.002)

        def higher_step():
            outer.zero_grad(set_to_none=True)
            with sdpa_kernel(SDPBackend.MATH):
                for task in tasks:
                    with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                        for _ in range(args.k):
                            diffopt.step(F.cross_entropy(fmodel(task.support), task.support["labels"]))
                        (F.cross_entropy(fmodel(task.query), task.query["labels"]) / len(tasks)).backward()
            outer.step()

        return higher_step
    raise ValueError(f"unknown variant {name!r}")


def _status(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_memory(args) -> int:
    """Run once in this (fresh) process; return peak RSS growth in bytes during one step."""
    model, tasks = build(args)
    fn = make_variant(args.memory_of, model, tasks, args)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return _status("VmHWM") - base


def synchronized(fn, device):
    """``fn`` followed by a wait for the device's queued work, so that timers see the whole step."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


def cuda_peak(fn) -> int:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_in_subprocess(variant, argv) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", variant], env=env,
                         capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--k", default="1", help="inner steps; a list (1,2,3,4) runs each in turn, one table")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--shots", type=int, default=2, help="support and query images per class")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights), tiny, or proxy (the CLI default)")
    p.add_argument("--text-path", default="fast", choices=["fast", "openclip"],
                   help="openclip: every variant runs open_clip's own text blocks (the path `higher`'s patched "
                        "blocks take), for a like-for-like comparison with higher2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.text_path == "openclip":
        import gram_plugin.backbones.openclip as openclip

        openclip._plain_attention_blocks = lambda transformer: False  # never the sequence-first loop
    ks = [int(k) for k in str(args.k).split(",")]
    if args.memory_of:
        args.k = ks[0]
        print(json.dumps({"peak_bytes": measure_memory(args)}))
        return 0
    t0, load0 = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    per_k = {k: run_k(argparse.Namespace(**{**vars(args), "k": k})) for k in ks}
    out = {"utc": [t0, time.strftime("%H:%M:%S", time.gmtime())], "loadavg": [load0, os.getloadavg()]}
    print(f"\nrun {out['utc'][0]}-{out['utc'][1]} UTC, load average {load0[0]:.2f} -> {out['loadavg'][1][0]:.2f}")
    if len(ks) > 1:
        print_k_table(per_k)
    if args.json:
        result = {"per_k": {str(k): r for k, r in per_k.items()}, **out} if len(ks) > 1 else {**per_k[ks[0]], **out}
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def print_k_table(per_k):
    """One row per k: CPU-time (or, on CUDA, wall) medians, peak memory and the ratios to higher2."""
    first = next(iter(per_k.values()))
    variants = list(first["median"])
    clock = "median" if first["args"]["device"] == "cuda" else "median_cpu"
    print(f"\n{clock} s / peak MiB / kept graphs per k")
    print("k  " + "  ".join(f"{v:>22s}" for v in variants))
    for k, r in per_k.items():
        cells = []
        for v in variants:
            mem = r["peak_bytes"].get(v)
            cells.append(f"{r[clock][v]:8.2f} {'-' if mem is None else f'{mem / 2**20:7.0f}'} {str(r['kept_graphs'][v] or '-'):>4s}")
        print(f"{k}  " + "  ".join(f"{c:>22s}" for c in cells))


def run_k(args) -> dict:
    """All variants at one k: round-robin timing, then peak memory per variant."""
    variants = args.variants.split(",")
    model, tasks = build(args)
    raw = {v: make_variant(v, model, tasks, args) for v in variants}
    fns = {v: synchronized(fn, args.device) for v, fn in raw.items()}
    for v in variants:  # warm-up: first-call allocations and lazy initialisation
        fns[v]()
    times, cpu = interleaved(fns, args.repeats)
    med, med_cpu = medians(times), medians(cpu)
    # inner steps whose graph the batched meta-step kept on its last group (None: not batched)
    kept = {v: getattr(getattr(fn, "meta_step", None), "last_kept_steps", None) for v, fn in raw.items()}
    if args.no_memory:
        mem = {}
    elif torch.device(args.device).type == "cuda":
        mem = {v: cuda_peak(fns[v]) for v in variants}
    else:
        fwd_argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k in ("classes", "n_ctx", "k", "tasks", "shots", "threads", "model", "text_path")]
        mem = {v: memory_in_subprocess(v, fwd_argv) for v in variants}

    print(f"\nmodel={args.model} text_path={args.text_path} device={args.device} classes={args.classes} n_ctx={args.n_ctx} k={args.k} "
          f"tasks={args.tasks} shots={args.shots} threads={args.threads} torch={torch.__version__}")
    print(f"{'variant':10s} {'median s':>9s} {'cpu s':>9s} {'peak MiB':>9s} {'kept graphs':>11s}")
    for v in variants:
        print(f"{v:10s} {med[v]:9.2f} {med_cpu[v]:9.2f} {mem.get(v, float('nan')) / 2**20:9.1f} {str(kept[v] or '-'):>11s}")
    ratios = {}
    for tag, m in (("time", med), ("cpu time", med_cpu)):
        if "plain" in m:
            for v in ("meta2", "meta2b", "metad", "meta1", "gram2", "gram2b"):
                if v in m:
                    ratios[f"{v}/plain {tag}"] = m[v] / m["plain"]
        for v in ("meta2", "meta2b", "metad"):
            if "higher2" in m and v in m:
                ratios[f"higher2/{v} {tag} (speed-up)"] = m["higher2"] / m[v]
        if "meta2" in m and "meta2b" in m:
            ratios[f"meta2/meta2b {tag} (speed-up of batching)"] = m["meta2"] / m["meta2b"]
    if mem and "higher2" in mem:
        for v in ("meta2", "meta2b", "metad"):
            if v in mem:
                ratios[f"{v}/higher2 peak memory"] = mem[v] / mem["higher2"]
    if mem and "plain" in mem and "meta2" in mem:
        ratios["meta2/plain peak memory"] = mem["meta2"] / mem["plain"]
    for k, v in ratios.items():
        print(f"{k:36s} {v:6.3f}")
    return {"args": vars(args), "times": times, "cpu": cpu, "median": med, "median_cpu": med_cpu, "kept_graphs": kept,
            "peak_bytes": mem, "ratios": ratios}


if __name__ == "__main__":
    sys.exit(main())
