"""``gram-plugin chc``: an image-caption corpus (or a captions file + image features) -> hierarchy JSON.

    gram-plugin chc --corpus DIR --out OUT/hierarchy.json         # + OUT/hierarchy.txt, OUT/hierarchy.png
    gram-plugin chc --captions FILE [--image-features F] --out H.json

``--out`` and the report / picture beside it are never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from .config import CHCConfig, CHCError
from .hierarchy import build_hierarchy, summary
from .reading import load_image_features, read_captions
from .scaling import SCALING_HELP


def build_parser() -> argparse.ArgumentParser:
    d = CHCConfig()
    p = argparse.ArgumentParser(
        prog="gram-plugin chc",
        description="Cross-Modal Hierarchical Clustering: captions -> topics (c-TF-IDF words) -> visual domains "
                    "(k-means on the corpus images' features inside each topic).",
    )
    src = p.add_argument_group("input: an image-caption corpus (--corpus) or a captions file (--captions)")
    src.add_argument("--corpus", help="corpus folder (captions file + images/) or its captions file: Flickr "
                     "'<image>#k<TAB>caption', COCO captions JSON, or CC3M-style '<path><TAB>caption'")
    src.add_argument("--captions", help="with --corpus: the captions file when the folder holds none or several; "
                     "alone: '<image>#k<TAB>caption' lines or one caption per line (.gz ok), no images")
    src.add_argument("--images", help="with --corpus: the image folder (default CORPUS/images, else CORPUS)")
    src.add_argument("--skip-missing", action="store_true",
                     help="with --corpus: leave out captions whose image file is missing (default: an error)")
    src.add_argument("--skip-unreadable", action="store_true",
                     help="with --corpus: leave out images that cannot be decoded (default: an error)")
    src.add_argument("--backbone", default="proxy",
                     help="with --corpus: whose frozen image tower gives the features for the visual domains "
                          "(proxy = ProxyCLIP v2, the default; open_clip MODEL:PRETRAINED; tiny[:SEED])")
    src.add_argument("--image-features", help="with --captions: .safetensors (tensor 'features', optional "
                     "metadata 'image_ids') or .npy")
    src.add_argument("--limit", type=int, help="with --captions: use only the first N captions")
    p.add_argument("--out", required=True, help="hierarchy JSON to write (with --corpus also OUT.txt and OUT.png "
                   "beside it); refused if there unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its .txt / .png) if they exist")
    p.add_argument("--cache-dir", help="cached caption embeddings and image features (default: OUT's folder/chc-cache)")
    p.add_argument("--examples", type=int, default=3, help="example captions per topic in OUT.txt")
    p.add_argument("--model", default=d.model, help="sentence-transformers model name or path")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--umap-neighbors", type=int, default=d.umap_neighbors)
    p.add_argument("--umap-components", type=int, default=d.umap_components)
    p.add_argument("--umap-min-dist", type=float, default=d.umap_min_dist)
    p.add_argument("--knn", choices=["auto", "exact", "nndescent"], default=d.knn,
                   help="UMAP neighbour search (auto: exact brute force up to --exact-knn-max points)")
    p.add_argument("--exact-knn-max", type=int, default=d.exact_knn_max)
    p.add_argument("--min-cluster-size", type=int, default=d.min_cluster_size, help=f"HDBSCAN; {SCALING_HELP}")
    p.add_argument("--min-samples", type=int, default=d.min_samples, help="HDBSCAN; default: scaled, see above")
    p.add_argument("--cluster-selection", dest="cluster_selection_method", choices=["eom", "leaf"], default="eom")
    p.add_argument("--noise", choices=["drop", "nearest"], default=d.noise)
    p.add_argument("--n-domains", type=int, default=d.n_domains)
    p.add_argument("--top-words", type=int, default=d.top_words)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _problems(args) -> list[str]:
    """Flag combinations that make no sense, and an --out that would replace a file (checked before any work)."""
    from .pipeline import hierarchy_files

    problems = []
    if args.corpus is None and args.captions is None:
        problems.append("give --corpus DIR (images + captions) or --captions FILE (captions only)")
    if args.corpus is not None:
        problems += [f"{flag} goes with --captions alone, not with --corpus"
                     for flag, v in (("--image-features", args.image_features), ("--limit", args.limit)) if v is not None]
    else:
        problems += [f"{flag} needs --corpus" for flag, v in (("--images", args.images), ("--skip-missing", args.skip_missing),
                                                              ("--skip-unreadable", args.skip_unreadable)) if v]
    files = hierarchy_files(args.out) if args.corpus is not None else [Path(args.out)]
    taken = [str(f) for f in files if f.exists()]
    if taken and not args.overwrite:
        problems.append(f"--out: {', '.join(taken)} already exist; pass --overwrite to replace, or choose another --out")
    if Path(args.out).is_dir():
        problems.append(f"--out {args.out} is a folder; name the hierarchy JSON file to write")
    return problems


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        problems = _problems(args)
        cfg = None
        try:
            cfg = CHCConfig(**{f.name: getattr(args, f.name) for f in fields(CHCConfig) if hasattr(args, f.name)},
                            progress=not args.quiet)
        except ValueError as e:
            problems += getattr(e, "problems", [str(e)])
        if problems:
            raise CHCError("invalid input:\n  - " + "\n  - ".join(problems))
        cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "chc-cache")
        t0 = time.perf_counter()
        if args.corpus is not None:
            written, h = _from_corpus(args, cfg, cache_dir)
        else:
            h = _from_captions(args, cfg, cache_dir)
            from .hierarchy import save_hierarchy

            written = [save_hierarchy(h, args.out)]
        h["timings_s"]["total_s"] = time.perf_counter() - t0
    except (ValueError, OSError) as e:  # CHCError, CorpusError, ConfigError, DataError; unreadable files
        print(f"gram-plugin chc: error: {e}", file=sys.stderr)
        return 2
    print(summary(h))
    print(f"wrote {', '.join(str(p) for p in written)} ({h['timings_s']['total_s']:.1f} s)")
    return 0


def _from_captions(args, cfg, cache_dir) -> dict:
    captions, ids = read_captions(args.captions)
    if args.limit is not None:
        captions = captions[: args.limit]
        ids = ids[: args.limit] if ids is not None else None
    feats = None
    if args.image_features:
        order = list(dict.fromkeys(ids)) if ids is not None else None
        feats = load_image_features(args.image_features, order)
    return build_hierarchy(captions, ids, feats, cfg, cache_dir=cache_dir)


def _from_corpus(args, cfg, cache_dir):
    from ..backbones import build_backbone
    from .corpus import read_corpus
    from .pipeline import corpus_chc, write_hierarchy

    corpus = read_corpus(args.corpus, captions=args.captions, images=args.images, skip_missing=args.skip_missing)
    if args.skip_unreadable:
        corpus, bad = corpus.without_unreadable()
        if bad:
            print(f"left out {len(bad)} unreadable images (--skip-unreadable): {bad[:5]}", file=sys.stderr)
    run = corpus_chc(corpus, build_backbone(args.backbone), cfg, cache_dir=cache_dir)
    written = write_hierarchy(run.hierarchy, corpus, args.out, overwrite=args.overwrite, examples=args.examples)
    return written, run.hierarchy
