"""CHC settings on a real image-caption corpus (flickr8k-1k: 1,000 photos x 5 captions): topics, noise, domains.

    python benchmarks/chc_corpus_settings.py --corpus ~/.cache/gram-plugin-tests/flickr8k-1k/flickr8k-1k \\
        --out /tmp/chc-corpus-settings [--backbone proxy] [--seeds 0,1]

For each UMAP seed, the captions are embedded (cached) and reduced by UMAP ONCE (the library's
``reduction.reduce_umap`` is memoised here, which is why build_hierarchy calls stages through their
modules); then ``build_hierarchy`` runs for every (min_cluster_size, min_samples) of the grid with
the corpus image features (``corpus_features``, the backbone's frozen image tower) for the k-means
domains. Per setting: topics, noise share, images left without a topic, topic sizes in images,
domain sizes, how many topics can give a task's 1 shot + 4 queries and 4 + 4 (CHCTaskSource's
rule), the largest topics' names, and the adjusted Rand index of the caption -> topic assignment
between UMAP seeds (the yardstick of benchmarks/CHC.md). Writes OUT/settings.jsonl and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def task_usable(h: dict, shots: int, queries: int) -> int:
    """Topics that can give ``shots`` from one domain plus ``queries`` more (CHCTaskSource's rule)."""
    return sum(1 for t in h["topics"] if any(len(d) >= shots for d in t["domains"]) and len(t["items"]) - shots >= queries)


def stats(h: dict) -> dict:
    sizes = sorted(len(t["items"]) for t in h["topics"])
    smallest_domain = [min(len(d) for d in t["domains"]) for t in h["topics"] if t["domains"]]
    largest_domain = [max(len(d) for d in t["domains"]) for t in h["topics"] if t["domains"]]
    top = sorted(h["topics"], key=lambda t: -len(t["items"]))
    return {
        "n_topics": h["n_topics"],
        "noise_share": round(h["noise"]["share"], 4),
        "images_without_topic": h["noise"]["items_without_topic"],
        "topic_images_min_median_max": [sizes[0], statistics.median(sizes), sizes[-1]] if sizes else None,
        "domain_images_smallest_median": statistics.median(smallest_domain) if smallest_domain else None,
        "domain_images_largest_median": statistics.median(largest_domain) if largest_domain else None,
        "usable_1shot_4q": task_usable(h, 1, 4),
        "usable_4shot_4q": task_usable(h, 4, 4),
        "top_topics": [(t["name"], len(t["items"])) for t in top[:12]],
    }


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", default="/tmp/chc-corpus-settings")
    p.add_argument("--backbone", default="proxy")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--min-cluster-sizes", default="5,8,10,12,15,20,30,50,100")
    p.add_argument("--min-samples", default="3,5,10")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from sklearn.metrics import adjusted_rand_score

    torch.set_num_threads(args.threads)
    from gram_plugin import chc
    from gram_plugin.chc import reduction  # its reduce_umap is memoised below
    from gram_plugin.backbones import build_backbone
    from gram_plugin.chc.corpus import read_corpus
    from gram_plugin.chc.images import corpus_features

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = read_corpus(args.corpus)
    t = time.perf_counter()
    feats = corpus_features(corpus, build_backbone(args.backbone), out / "cache", progress=False)
    print(f"features {tuple(feats.shape)} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    memo = {}
    real_reduce = reduction.reduce_umap

    def reduce_once(emb, cfg):
        key = (cfg.umap_neighbors, cfg.umap_components, cfg.umap_min_dist, cfg.seed, cfg.knn)
        if key not in memo:
            t0 = time.perf_counter()
            memo[key] = real_reduce(emb, cfg)
            print(f"UMAP {key}: {time.perf_counter() - t0:.1f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        return memo[key]

    reduction.reduce_umap = reduce_once
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, labels = [], {}
    for mcs in [int(x) for x in args.min_cluster_sizes.split(",")]:
        for ms in [int(x) for x in args.min_samples.split(",")]:
            if ms > mcs:
                continue
            for seed in seeds:
                cfg = chc.CHCConfig(min_cluster_size=mcs, min_samples=ms, seed=seed, progress=False)
                t0 = time.perf_counter()
                h = chc.build_hierarchy(corpus.captions, corpus.caption_image_ids(), feats, cfg, cache_dir=out / "cache")
                row = {"min_cluster_size": mcs, "min_samples": ms, "seed": seed, **stats(h),
                       "seconds_after_umap": round(time.perf_counter() - t0, 2)}
                topic = np.full(h["n_captions"], -1)
                for tp in h["topics"]:
                    topic[tp["captions"]] = tp["id"]
                labels[(mcs, ms, seed)] = topic
                if seed != seeds[0]:
                    a, b = labels[(mcs, ms, seeds[0])], topic
                    both = (a >= 0) & (b >= 0)
                    row["ari_vs_seed0_all"] = round(adjusted_rand_score(a, b), 3)
                    row["ari_vs_seed0_in_topics"] = round(adjusted_rand_score(a[both], b[both]), 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "settings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| min_cluster_size | min_samples | seed | topics | noise | images w/o topic | topic images min/med/max "
          "| usable 1+4 / 4+4 | ARI vs seed 0 (all / in topics) | largest topics |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ari = f"{r['ari_vs_seed0_all']} / {r['ari_vs_seed0_in_topics']}" if "ari_vs_seed0_all" in r else ""
        top = ", ".join(f"{n} {k}" for n, k in r["top_topics"][:6])
        print(f"| {r['min_cluster_size']} | {r['min_samples']} | {r['seed']} | {r['n_topics']} | "
              f"{100 * r['noise_share']:.1f} % | {r['images_without_topic']} | "
              f"{'/'.join(str(x) for x in r['topic_images_min_median_max'] or [])} | "
              f"{r['usable_1shot_4q']} / {r['usable_4shot_4q']} | {ari} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
