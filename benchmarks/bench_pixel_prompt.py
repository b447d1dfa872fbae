"""What a pixel prompt costs on ProxyCLIP v2: images can no longer be cached.

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/bench_pixel_prompt.py [--image-size 128] [--steps 2]

Side by side in one process, at 1 thread, on Caltech101 base-class training images (the tasks of
benchmarks/unigram_proxy.py: 5-way, 4 support + 8 query shots, 2 inner steps, 2 tasks per step):

* meta-step seconds: GRAM text-only on cached features vs UNIGRAM (text context + pixel prompt) on
  images, each first-order and second-order (second order differentiates through the inner
  gradient, i.e. through the CNN's backward);
* tuning-epoch seconds (4 shots x 50 base classes, batch 64): CoOp on cached features vs CoOp + pixel
  prompt on images.

CPU time (``time.process_time``) per meta-step covers all steps including one warm-up; wall time is
the median of the steps after it. Prints a markdown table and the load average at start and end
(the machine is shared: read the CPU ratios, not the wall seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
from gram_plugin.cache import FeatureCache
from gram_plugin.data import NWayKShotTasks, benchmark_sets, few_shot
from gram_plugin.finetune import tune
from gram_plugin.models import PromptedCLIP
from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2


def meta_step_seconds(backbone, mode, train, first_order, steps) -> tuple[float, float]:
    model = PromptedCLIP(backbone, mode=mode, ctx_init="a photo of a")
    source = NWayKShotTasks(train, 5, 4, 8)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=2, outer_lr=0.01, meta_batch_size=2, steps=steps + 1, clip_gamma=5.0,
                     first_order=first_order, progress=False)
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=GradientRegulator.for_module(model),
                                config=cfg, metadata=model.config())
    cpu = time.process_time()
    trainer.fit(source)
    cpu = (time.process_time() - cpu) / (steps + 1)  # per step, the warm-up step included
    return cpu, statistics.median(r["seconds"] for r in trainer.history[1:])  # wall: the warm-up step left out


def epoch_seconds(backbone, mode, train) -> tuple[float, float]:
    model = PromptedCLIP(backbone, mode=mode, ctx_init="a photo of a")
    cpu, wall = time.process_time(), time.perf_counter()
    tune(model, train, epochs=1, lr=0.01, batch_size=64, optimizer="adam", progress=False)
    return time.process_time() - cpu, time.perf_counter() - wall


def tower_ms_per_image(net, size: int, batch: int = 16, repeats: int = 2) -> tuple[float, float]:
    """CPU ms per image of the frozen tower: forward, and forward + backward to an additive input prompt."""
    x = torch.randn(batch, 3, size, size)
    prompt = torch.zeros(1, 3, size, size, requires_grad=True)
    with torch.no_grad():
        net(x)  # warm-up
    fwd, both = [], []
    for _ in range(repeats):
        t = time.process_time()
        with torch.no_grad():
            net(x)
        fwd.append(time.process_time() - t)
        t = time.process_time()
        net(x + prompt).logsumexp(-1).sum().backward()
        both.append(time.process_time() - t)
    return 1000 * statistics.median(fwd) / batch, 1000 * statistics.median(both) / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed meta-steps per setting (after one warm-up)")
    p.add_argument("--feature-cache", default=os.path.expanduser("~/.cache/gram-plugin/features"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    backbone = ProxyCLIPv2(image_size=args.image_size)
    cache = FeatureCache(args.feature_cache, progress=False)
    images = benchmark_sets(backbone.preprocess)["caltech101"]["base_train"]
    feats = cache.attach(backbone, images)
    rows = []
    for label, mode, data, first_order in (("GRAM, text only, cached features", "coop", feats, True),
                                           ("GRAM, text only, cached features", "coop", feats, False),
                                           ("UNIGRAM, text + pixel prompt, images", "unigram", images, True),
                                           ("UNIGRAM, text + pixel prompt, images", "unigram", images, False)):
        s = meta_step_seconds(backbone, mode, data, first_order, args.steps)
        rows.append((f"meta-step: {label}, {'first' if first_order else 'second'} order", s))
        print(rows[-1], flush=True)
    for label, mode, data in (("CoOp, cached features", "coop", feats), ("CoOp + pixel prompt, images", "unigram", images)):
        s = epoch_seconds(backbone, mode, few_shot(data, 4, seed=1))
        rows.append((f"tuning epoch (4 shots x {len(data.classnames)} classes): {label}", s))
        print(rows[-1], flush=True)
    for size in sorted({args.image_size, 224}):
        fwd, both = tower_ms_per_image(backbone.visual, size)
        print(f"EfficientNet-Lite0 at {size} px: {fwd:.0f} ms forward, {both:.0f} ms forward + backward per image (CPU)",
              flush=True)
    load_end = os.getloadavg()
    base_meta, base_epoch = rows[0][1], rows[4][1]
    print(f"\nProxyCLIP v2 at {args.image_size} px, 1 thread; load average {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end (2 shared cores)\n")
    print("| what | CPU s | ratio (CPU) | wall s | ratio (wall) |\n|---|---|---|---|---|")
    for i, (what, (cpu, wall)) in enumerate(rows):
        ref = base_meta if i < 4 else base_epoch
        print(f"| {what} | {cpu:.2f} | {cpu / ref[0]:.1f}x | {wall:.2f} | {wall / ref[1]:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
