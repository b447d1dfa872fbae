"""Does torch.func.vmap over the tasks of a meta-batch pay on CPU? (A measurement of the idea; the
core keeps its per-task loop.)

One second-order MAML meta-gradient over ``--tasks`` N-way CoOp tasks (every task with its own class
names, same N and shots so that tasks can be stacked), three ways:

  loop     MetaPromptTrainer.outer_step (what ships: one task at a time, backward per task)
  func     the same meta-gradient written with torch.func (grad of grad), python loop over tasks
  vmap     torch.func.grad of vmap(adapted query loss) over the stacked tasks: one batched
           text-tower pass of tasks x classes prompts per inner step

The func/vmap meta-gradients are checked against the trainer's (same theta, same tasks). Model: a
random-init open_clip CLIP text tower (--width, --layers, 77 tokens), CoOp context of 4 tokens,
image side as precomputed features. Times: round-robin, median of --repeats, in one process;
wall-clock and process CPU time (the steadier one on a shared machine with --threads 1).
Peak memory is not measured here (vmap holds every task's graph at once, the loop one task's).

    python3 benchmarks/bench_vmap_tasks.py --width 128 --layers 2 --classes 5 --tasks 4 --k 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gram_plugin import MetaConfig, MetaPromptTrainer, Task  # noqa: E402
from timing import interleaved, medians  # noqa: E402  (benchmarks/timing.py)

WORDS = ["apple", "bridge", "castle", "dolphin", "engine", "forest", "guitar", "harbor", "island", "jacket",
         "kettle", "lemon", "mountain", "needle", "orchid", "parrot", "quilt", "river", "saddle", "tiger"]


def build(args):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from gram_plugin.backbones import OpenCLIPBackbone
    from gram_plugin.models import PromptedCLIP

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    clip = CLIP(embed_dim=args.width,
                vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=32),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=args.width,
                                     heads=max(1, args.width // 64), layers=args.layers))
    backbone = OpenCLIPBackbone(clip.eval())
    model = PromptedCLIP(backbone, "coop", n_ctx=4, ctx_init=None)
    g = torch.Generator().manual_seed(1)
    tasks, stacked = [], {k: [] for k in ("prefix", "suffix", "ids", "fs", "ls", "fq", "lq")}
    for _ in range(args.tasks):
        pick = torch.randperm(len(WORDS), generator=g)[: args.classes].tolist()
        names = [WORDS[i] for i in pick]
        n = args.classes * args.shots
        sup = {"features": torch.randn(n, backbone.embed_dim, generator=g), "labels": torch.arange(n) % args.classes,
               "classnames": names}
        qry = {"features": torch.randn(n, backbone.embed_dim, generator=g), "labels": torch.arange(n) % args.classes,
               "classnames": names}
        tasks.append(Task(sup, qry))
        model.set_classnames(names)
        stacked["prefix"].append(model.token_prefix.clone())
        stacked["suffix"].append(model.token_suffix.clone())
        stacked["ids"].append(model.token_ids.clone())
        stacked["fs"].append(sup["features"])
        stacked["ls"].append(sup["labels"])
        stacked["fq"].append(qry["features"])
        stacked["lq"].append(qry["labels"])
    stacked = {k: torch.stack(v) for k, v in stacked.items()}
    return model, backbone, tasks, stacked


def functional_meta_grad(backbone, args, use_vmap):
    scale = float(backbone.logit_scale)

    def task_loss(ctx, prefix, suffix, ids, feats, labels):
        n = prefix.shape[0]
        emb = torch.cat([prefix, ctx.unsqueeze(0).expand(n, -1, -1), suffix], dim=1)
        txt = F.normalize(backbone.encode_text_embeddings(emb, ids).float(), dim=-1)
        img = F.normalize(feats.float(), dim=-1)
        return F.cross_entropy(scale * img @ txt.t(), labels)

    def adapted_query_loss(ctx, prefix, suffix, ids, fs, ls, fq, lq):
        for _ in range(args.k):
            ctx = ctx - args.inner_lr * torch.func.grad(task_loss)(ctx, prefix, suffix, ids, fs, ls)
        return task_loss(ctx, prefix, suffix, ids, fq, lq)

    keys = ("prefix", "suffix", "ids", "fs", "ls", "fq", "lq")

    def meta_loss(ctx, st):
        if use_vmap:
            losses = torch.func.vmap(adapted_query_loss, in_dims=(None,) + (0,) * len(keys))(ctx, *(st[k] for k in keys))
            return losses.mean()
        return sum(adapted_query_loss(ctx, *(st[k][t] for k in keys)) for t in range(st["ids"].shape[0])) / st["ids"].shape[0]

    return torch.func.grad(meta_loss)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, backbone, tasks, stacked = build(args)
    cfg = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.k, meta_batch_size=args.tasks, progress=False,
                     outer_lr=1e-12)  # the Adam step barely moves theta: every variant sees the same theta
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, config=cfg)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grads = {"func": functional_meta_grad(backbone, args, False), "vmap": functional_meta_grad(backbone, args, True)}

    def run(v):
        if v == "loop":
            trainer.outer_step(tasks)
            return model.ctx.grad.clone()
        with sdpa_kernel(SDPBackend.MATH):
            return grads[v](model.ctx.detach(), stacked)

    variants = ("loop", "func", "vmap")
    ref = run("loop")
    check = {}
    for v in ("func", "vmap"):
        g = run(v)
        check[v] = float((g - ref).abs().max() / ref.abs().max())
    print("max |meta-grad - loop's| / max |loop's|: " + ", ".join(f"{v} {e:.1e}" for v, e in check.items()), flush=True)
    times, cpu = interleaved({v: (lambda v=v: run(v)) for v in variants}, args.repeats, digits=3)
    med, med_cpu = medians(times), medians(cpu)
    print(f"\nwidth={args.width} layers={args.layers} classes={args.classes} shots={args.shots} tasks={args.tasks} "
          f"k={args.k} threads={args.threads} torch={torch.__version__}")
    for v in variants:
        print(f"{v:5s} median {med[v]:.3f}s  /loop {med[v] / med['loop']:.3f}   "
              f"cpu {med_cpu[v]:.3f}s  /loop {med_cpu[v] / med_cpu['loop']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "cpu": cpu, "median": med,
                                               "median_cpu": med_cpu,
                                               "rel_error": check}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
