"""What keying the feature cache on image content costs (issue 27): the key of the real Caltech101 set.

    python3 benchmarks/bench_cache_key.py [--repeats 5] [--encode 256] [--backbone proxy]

Variants, run round-robin in one process (``timing.interleaved``), medians reported:

* ``stat``: the previous key (path, size, mtime of every file: ``os.stat`` only);
* ``content``: today's key (``cache.cache_key``: the SHA-256 of every file's bytes, in order);
* ``content+rows``: what a cache *hit* computes now besides reading the file: the key, plus checking
  the rows of a cached (N, D) feature file against the images (``cache.rows_sha256``).

For scale, ``--encode N`` times the image tower of ``--backbone`` on N of the images (load, transform,
encode: what a cache miss pays per image) and extrapolates to the whole set. The file bytes come from
the page cache after the first round (warm); a first read from disk costs what the disk costs on top.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, medians  # noqa: E402

from gram_plugin.backbones import build_backbone  # noqa: E402
from gram_plugin.cache import cache_key, encode_dataset, image_digests, rows_sha256  # noqa: E402
from gram_plugin.data import caltech101, extract_archive  # noqa: E402


def stat_key(backbone, dataset) -> str:
    """The key before issue 27: file size and mtime instead of the bytes."""
    files = hashlib.sha256()
    for it in dataset.items:
        st = os.stat(it.path)
        files.update(json.dumps([it.path, st.st_size, st.st_mtime_ns, it.label]).encode())
    parts = {"backbone": backbone.name, "weights": backbone.weights_id(), "transform": repr(dataset.transform),
             "n_files": len(dataset.items), "files": files.hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def hit_check(backbone, dataset, feats) -> str:
    """What ``FeatureCache.features`` computes on a hit besides reading the file: digests, key, row binding."""
    digests = image_digests(dataset)
    cache_key(backbone, dataset, digests)
    return rows_sha256(digests, feats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encode", type=int, default=256, help="images to encode for the per-image miss cost (0: skip)")
    ap.add_argument("--backbone", default="proxy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=None, help="folder with caltech-101.tar (default $GRAM_SHARED_DATA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    bb = build_backbone(args.backbone)
    ds = caltech101(extract_archive("caltech-101.tar", args.data), bb.preprocess)
    size = sum(os.path.getsize(it.path) for it in ds.items)
    print(f"{ds.name}: {len(ds)} images, {size / 2**20:.1f} MiB", flush=True)
    feats = torch.randn(len(ds), bb.embed_dim)  # a cached file's rows (the values do not change the cost)
    wall, cpu = interleaved({
        "stat": lambda: stat_key(bb, ds),
        "content": lambda: cache_key(bb, ds),
        "content+rows": lambda: hit_check(bb, ds, feats),
    }, args.repeats, digits=3)
    w, c = medians(wall), medians(cpu)
    out = {"images": len(ds), "mib": round(size / 2**20, 1), "threads": args.threads,
           "median_wall_s": {k: round(v, 4) for k, v in w.items()},
           "median_cpu_s": {k: round(v, 4) for k, v in c.items()},
           "content_mib_per_s_cpu": round(size / 2**20 / c["content"], 1)}
    if args.encode:
        sub = ds.subset(range(0, len(ds), max(1, len(ds) // args.encode))[: args.encode])
        t0, c0 = time.perf_counter(), time.process_time()
        encode_dataset(bb, sub, batch_size=64, progress=False)
        per_image_cpu = (time.process_time() - c0) / len(sub)
        out["encode"] = {"backbone": bb.name, "images": len(sub), "wall_s": round(time.perf_counter() - t0, 2),
                         "cpu_s_per_image": round(per_image_cpu, 5),
                         "whole_set_cpu_s_extrapolated": round(per_image_cpu * len(ds), 1)}
        out["content_key_vs_encoding_whole_set"] = round(c["content"] / (per_image_cpu * len(ds)), 5)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
