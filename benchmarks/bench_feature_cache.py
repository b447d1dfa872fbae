"""Cached vs uncached image features in CoOp-style meta-training (one run, prints the time ratio).

    python3 benchmarks/bench_feature_cache.py [--steps 20] [--image-size 224] [--threads 1] [--repeats 3]
    python3 benchmarks/bench_feature_cache.py --backbone proxy --workload coop-epoch --repeats 3

``--backbone``: ``tiny`` (a random tiny open_clip CLIP at ``--image-size``, the default) or any
``build_backbone`` spec (``proxy`` = ProxyCLIP v2, EfficientNet-Lite0 at 224 px). ``--workload``:
``meta`` (the meta-training run below) or ``coop-epoch`` (one CoOp epoch of ``finetune.tune`` over the
base classes' training images, batch 32: what ``gram-plugin tune`` does per epoch).

Both runs meta-train the same PromptedCLIP (text context only) on the same N-way tasks drawn from
the embedded real images; "uncached" loads and encodes every task's images through the frozen image
tower, "cached" reads features computed once by FeatureCache (the one-off encoding is timed apart).
With ``--repeats R`` the two runs alternate R times (uncached, cached, uncached, ...) and the medians
are compared, so that the ratio is taken side by side on a machine whose load changes.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
from gram_plugin.backbones import tiny_openclip
from gram_plugin.cache import FeatureCache
from gram_plugin.data import NWayKShotTasks, default_dataset, subsample_classes
from gram_plugin.models import PromptedCLIP


def run(bb, dataset, steps, seed=0):
    model = PromptedCLIP(bb, mode="coop")
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=GradientRegulator.for_module(model),
                                config=MetaConfig(inner_steps=2, meta_batch_size=2, steps=steps, seed=seed, progress=False))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(NWayKShotTasks(dataset, n_way=3, k_support=4, k_query=8))
    return time.perf_counter() - t0, model.ctx.detach().clone(), time.process_time() - c0


def run_coop_epoch(bb, dataset, seed=0):
    from gram_plugin.finetune import tune

    model = PromptedCLIP(bb, mode="coop")
    t0, c0 = time.perf_counter(), time.process_time()
    tune(model, dataset, epochs=1, batch_size=32, seed=seed, progress=False)
    return time.perf_counter() - t0, model.ctx.detach().clone(), time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=224, help="CLIP's input size (64: a cheap image tower, smaller ratio)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backbone", default="tiny", help="tiny, or a build_backbone spec such as proxy")
    ap.add_argument("--workload", default="meta", choices=["meta", "coop-epoch"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.backbone == "tiny":
        bb = tiny_openclip(0, image_size=args.image_size)
    else:
        from gram_plugin.backbones import build_backbone

        bb = build_backbone(args.backbone)
    work = (lambda b, d: run(b, d, args.steps)) if args.workload == "meta" else run_coop_epoch
    base = subsample_classes(default_dataset(bb.preprocess), "base")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cached = FeatureCache(d, progress=False).attach(bb, base)
        encode_s = time.perf_counter() - t0
    times = {"uncached": [], "cached": []}
    cpu = {"uncached": [], "cached": []}
    for _ in range(args.repeats):
        uncached_s, ctx_u, uncached_cpu = work(bb, base)
        cached_s, ctx_c, cached_cpu = work(bb, cached)
        times["uncached"].append(uncached_s)
        times["cached"].append(cached_s)
        cpu["uncached"].append(uncached_cpu)
        cpu["cached"].append(cached_cpu)
    uncached_s, cached_s = statistics.median(times["uncached"]), statistics.median(times["cached"])
    cpu_ratio = statistics.median(cpu["uncached"]) / statistics.median(cpu["cached"])
    result = {"backbone": getattr(bb, "name", args.backbone), "workload": args.workload, "n_images": len(base),
              "steps": args.steps, "image_size": args.image_size, "threads": args.threads, "repeats": args.repeats,
              "uncached_s": round(uncached_s, 2), "cached_s": round(cached_s, 2),
              "one_off_encode_s": round(encode_s, 2), "speedup": round(uncached_s / cached_s, 2),
              "speedup_per_pair": [round(u / c, 2) for u, c in zip(times["uncached"], times["cached"])],
              "cpu_speedup": round(cpu_ratio, 2),
              "same_result": bool(torch.allclose(ctx_u, ctx_c, atol=1e-4))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
