"""``gram-plugin chc``: captions (+ image features) -> hierarchy JSON."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from .config import CHCConfig, CHCError
from .hierarchy import build_hierarchy, save_hierarchy, summary
from .reading import load_image_features, read_captions

def build_parser() -> argparse.ArgumentParser:
    d = CHCConfig()
    p = argparse.ArgumentParser(
        prog="gram-plugin chc",
        description="Cross-Modal Hierarchical Clustering: captions -> topics (c-TF-IDF words) -> visual domains.",
    )
    p.add_argument("--captions", required=True, help="'<image>#k<TAB>caption' lines or one caption per line (.gz ok)")
    p.add_argument("--image-features", help=".safetensors (tensor 'features', optional metadata 'image_ids') or .npy")
    p.add_argument("--out", required=True, help="hierarchy JSON to write")
    p.add_argument("--cache-dir", help="folder for cached sentence embeddings (default: next to --out)")
    p.add_argument("--model", default=d.model, help="sentence-transformers model name or path")
    p.add_argument("--limit", type=int, help="use only the first N captions")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--umap-neighbors", type=int, default=d.umap_neighbors)
    p.add_argument("--umap-components", type=int, default=d.umap_components)
    p.add_argument("--umap-min-dist", type=float, default=d.umap_min_dist)
    p.add_argument("--knn", choices=["auto", "exact", "nndescent"], default=d.knn,
                   help="UMAP neighbour search (auto: exact brute force up to --exact-knn-max points)")
    p.add_argument("--exact-knn-max", type=int, default=d.exact_knn_max)
    p.add_argument("--min-cluster-size", type=int, default=d.min_cluster_size)
    p.add_argument("--min-samples", type=int, default=d.min_samples)
    p.add_argument("--cluster-selection", dest="cluster_selection_method", choices=["eom", "leaf"], default="eom")
    p.add_argument("--noise", choices=["drop", "nearest"], default=d.noise)
    p.add_argument("--n-domains", type=int, default=d.n_domains)
    p.add_argument("--top-words", type=int, default=d.top_words)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = CHCConfig(
            **{f.name: getattr(args, f.name) for f in fields(CHCConfig) if hasattr(args, f.name)},
            progress=not args.quiet,
        )
        captions, ids = read_captions(args.captions)
        if args.limit is not None:
            captions = captions[: args.limit]
            ids = ids[: args.limit] if ids is not None else None
        feats = None
        if args.image_features:
            order = list(dict.fromkeys(ids)) if ids is not None else None
            feats = load_image_features(args.image_features, order)
        cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "chc-cache")
        t0 = time.perf_counter()
        h = build_hierarchy(captions, ids, feats, cfg, cache_dir=cache_dir)
        h["timings_s"]["total_s"] = time.perf_counter() - t0
        save_hierarchy(h, args.out)
    except (CHCError, ValueError) as e:
        print(f"gram-plugin chc: error: {e}", file=sys.stderr)
        return 2
    print(summary(h))
    print(f"wrote {args.out} ({h['timings_s']['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
