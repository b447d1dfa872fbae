"""Cost of one GRAM outer step on CHC tasks of an image-caption corpus: second vs first order.

    python benchmarks/chc_meta_cost.py --corpus ~/.cache/gram-plugin-tests/flickr8k-1k/flickr8k-1k \\
        --cache-dir /tmp/chc-meta-cost [--backbones proxy,ViT-B-32] [--repeats 3]

For each backbone (``proxy`` = ProxyCLIP v2; an open_clip model name without a pretrained tag is
built with random weights of the real size, which costs the same as the trained ones), CHC runs once
over the corpus (default CHCConfig, image features from the feature cache); then outer steps of
:class:`~gram_plugin.meta.MetaPromptTrainer` (GRAM: prompt init + regulator, MetaConfig's defaults
unless given) are timed round-robin (benchmarks/timing.py) for: text prompts on cached features
(``coop``) and text + pixel prompts on images (``unigram``), each in second and first order.
Reports medians of wall and process-CPU seconds per outer step, the peak RSS of the process during
each variant's steps (MiB), and the load average. ``--orders second`` / ``first`` times one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chc_scale import _reset_peak, _status_kib  # noqa: E402  (peak RSS of a stretch of this process)
from timing import interleaved, medians  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--cache-dir", default="/tmp/chc-meta-cost")
    p.add_argument("--backbones", default="proxy")
    p.add_argument("--modes", default="coop,unigram")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--meta-batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--orders", default="second,first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the medians as JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from gram_plugin.backbones import OpenCLIPBackbone, build_backbone
    from gram_plugin.chc import CHCConfig, corpus_chc, read_corpus
    from gram_plugin.meta import MetaConfig, MetaPromptTrainer
    from gram_plugin.models import PromptedCLIP
    from gram_plugin.regulator import GradientRegulator

    corpus = read_corpus(args.corpus)
    result = {"load_average_start": os.getloadavg(), "threads": args.threads, "corpus": corpus.describe()}
    for spec in args.backbones.split(","):
        backbone = build_backbone(spec) if spec in ("proxy", "tiny") or ":" in spec else OpenCLIPBackbone(spec)
        run = corpus_chc(corpus, backbone, CHCConfig(progress=False), cache_dir=args.cache_dir)
        overrides = {k: v for k, v in (("inner_steps", args.inner_steps), ("meta_batch_size", args.meta_batch_size))
                     if v is not None}
        fns, described, peak = {}, {}, {}
        for mode in args.modes.split(","):
            source = run.task_source(args.n_way, args.shots, args.queries,
                                     transform=None if mode == "coop" else backbone.preprocess)
            for order in args.orders.split(","):
                model = PromptedCLIP(backbone, seed=0, mode=mode)
                cfg = MetaConfig(first_order=order == "first", progress=False, **overrides)
                trainer = MetaPromptTrainer(model.meta_loss_fn(), model, GradientRegulator.for_module(model), cfg)
                gen = torch.Generator().manual_seed(0)

                name = f"{mode}-{order}"

                def step(trainer=trainer, source=source, gen=gen, name=name):
                    _reset_peak()
                    trainer.outer_step([source.sample(gen) for _ in range(trainer.config.meta_batch_size)])
                    peak[name] = max(peak.get(name, 0), _status_kib("VmHWM") // 1024)

                step()  # warm-up (first forward builds caches)
                fns[name] = step
                described[name] = {"inner_steps": cfg.inner_steps, "meta_batch_size": cfg.meta_batch_size}
        wall, cpu = interleaved(fns, args.repeats)
        result[spec] = {"topics": run.hierarchy["n_topics"], "wall_s_median": medians(wall), "cpu_s_median": medians(cpu),
                        "peak_rss_mib": peak, "settings": described}
        print(json.dumps({spec: result[spec]}, indent=1), flush=True)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps({"load": [result["load_average_start"], result["load_average_end"]]}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
