"""``gram-plugin chc``: an image-caption corpus (or a captions file + image features) -> a CHC hierarchy.

    gram-plugin chc --corpus DIR --out OUT/hierarchy.json         # + OUT/hierarchy.txt, OUT/hierarchy.png
    gram-plugin chc --captions FILE [--image-features F] --out H.json

``--out`` (and the report and picture beside it) is never replaced unless ``--overwrite`` is given;
every flag is checked before anything is read or computed. The library calls are
:func:`gram_plugin.chc.read_corpus`, :func:`~gram_plugin.chc.corpus_chc` and
:func:`~gram_plugin.chc.write_hierarchy` (or :func:`~gram_plugin.chc.build_hierarchy` for captions alone).
"""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

from ..chc.config import CHCConfig, hierarchy_files
from ..chc.scaling import SCALING_HELP
from ..config import ConfigError, backbone_problems
from .options import DEFAULT_BACKBONE, CLIError

DESCRIPTION = """Cross-Modal Hierarchical Clustering (GRAM): captions -> Sentence-BERT -> UMAP -> HDBSCAN topics named
by c-TF-IDF; k-means on the corpus images' features (the backbone's frozen image tower) inside each topic ->
visual domains. With --corpus it writes OUT (the hierarchy), OUT.txt (topics, sizes, domains, example captions)
and OUT.png (thumbnails per topic and domain)."""


def add_parser(sub) -> None:
    d = CHCConfig()
    p = sub.add_parser("chc", help="CHC topics and visual domains of an image-caption corpus -> hierarchy JSON "
                       "(+ .txt report, .png picture)", description=DESCRIPTION)
    src = p.add_argument_group("input: an image-caption corpus (--corpus) or a captions file alone (--captions)")
    src.add_argument("--corpus", help="corpus folder (a captions file + images/) or its captions file: Flickr "
                     "'<image>#k<TAB>caption', COCO captions JSON, or CC3M-style '<path><TAB>caption' (README)")
    src.add_argument("--captions", help="with --corpus: the captions file when the folder holds none or several; "
                     "alone: '<image>#k<TAB>caption' lines or one caption per line (.gz ok), no images")
    src.add_argument("--images", help="with --corpus: the image folder (default CORPUS/images, else CORPUS)")
    src.add_argument("--skip-missing", action="store_true",
                     help="with --corpus: leave out captions whose image file is missing (default: an error)")
    src.add_argument("--skip-unreadable", action="store_true",
                     help="with --corpus: leave out images that cannot be decoded (default: an error)")
    src.add_argument("--backbone", default=None,
                     help=f"with --corpus: whose frozen image tower gives the features of the visual domains "
                          f"(default {DEFAULT_BACKBONE}: ProxyCLIP v2; open_clip MODEL:PRETRAINED; tiny[:SEED])")
    src.add_argument("--image-features", help="with --captions: .safetensors (tensor 'features', optional metadata "
                     "'image_ids') or .npy")
    src.add_argument("--limit", type=int, help="with --captions: use only the first N captions")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="hierarchy JSON to write (with --corpus also OUT.txt and OUT.png "
                     "beside it); refused if there unless --overwrite")
    out.add_argument("--overwrite", action="store_true", help="replace --out (and its .txt / .png) if they exist")
    out.add_argument("--cache-dir", dest="cache_dir", help="cached caption embeddings and image features "
                     "(default: OUT's folder/chc-cache)")
    out.add_argument("--examples", type=int, default=3, help="example captions per topic in OUT.txt")
    c = p.add_argument_group("CHC settings (defaults: CHCConfig)")
    c.add_argument("--model", default=d.model, help="sentence-transformers model name or path")
    c.add_argument("--encode-batch-size", "--batch-size", dest="encode_batch_size", type=int, default=d.batch_size,
                   help="captions per encoder batch")
    c.add_argument("--umap-neighbors", dest="umap_neighbors", type=int, default=d.umap_neighbors)
    c.add_argument("--umap-components", dest="umap_components", type=int, default=d.umap_components)
    c.add_argument("--umap-min-dist", dest="umap_min_dist", type=float, default=d.umap_min_dist)
    c.add_argument("--knn", choices=["auto", "exact", "nndescent"], default=d.knn,
                   help="UMAP neighbour search (auto: exact brute force up to --exact-knn-max points)")
    c.add_argument("--exact-knn-max", dest="exact_knn_max", type=int, default=d.exact_knn_max)
    add_hdbscan_flags(c)
    c.add_argument("--cluster-selection", dest="cluster_selection_method", choices=["eom", "leaf"],
                   default=d.cluster_selection_method)
    c.add_argument("--noise", choices=["drop", "nearest"], default=d.noise)
    c.add_argument("--top-words", dest="top_words", type=int, default=d.top_words)
    c.add_argument("--device", default=d.device, help="where the caption encoder runs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (not only its message)")
    p.set_defaults(func=cmd_chc)


def add_hdbscan_flags(g) -> None:
    """The CHC knobs that decide the topics and domains (shared by ``chc`` and ``meta-train --tasks chc:``)."""
    d = CHCConfig()
    g.add_argument("--min-cluster-size", dest="min_cluster_size", type=int, default=d.min_cluster_size,
                   help=f"HDBSCAN; {SCALING_HELP}")
    g.add_argument("--min-samples", dest="min_samples", type=int, default=d.min_samples,
                   help="HDBSCAN (default: scaled with --min-cluster-size, see above)")
    g.add_argument("--n-domains", dest="n_domains", type=int, default=d.n_domains,
                   help="visual domains per topic (k of k-means on the image features)")


def chc_config(args, **given) -> CHCConfig:
    """The ``CHCConfig`` of the flags present in ``args`` (``given`` wins); raises ``ConfigError``."""
    values = {f.name: getattr(args, f.name) for f in fields(CHCConfig) if hasattr(args, f.name)}
    if hasattr(args, "encode_batch_size"):
        values["batch_size"] = args.encode_batch_size
    return CHCConfig(**{**values, "progress": not args.quiet, **given})


def _problems(args) -> list[str]:
    """Flag combinations that make no sense, and an --out that would replace a file (checked before any work)."""
    problems = []
    if args.corpus is None and args.captions is None:
        problems.append("give --corpus DIR (images + captions) or --captions FILE (captions only)")
    if args.corpus is not None:
        problems += [f"{flag} goes with --captions alone, not with --corpus"
                     for flag, v in (("--image-features", args.image_features), ("--limit", args.limit)) if v is not None]
    else:
        problems += [f"{flag} needs --corpus" for flag, v in (("--images", args.images), ("--skip-missing", args.skip_missing),
                                                              ("--skip-unreadable", args.skip_unreadable),
                                                              ("--backbone", args.backbone)) if v]
    if args.corpus is not None and args.backbone:
        problems += backbone_problems(args.backbone)
    if Path(args.out).is_dir():
        problems.append(f"--out {args.out} is a folder; name the hierarchy JSON file to write")
    else:
        files = hierarchy_files(args.out) if args.corpus is not None else [Path(args.out)]
        taken = [str(f) for f in files if f.exists()]
        if taken and not args.overwrite:
            problems.append(f"--out: {', '.join(taken)} already exist; pass --overwrite to replace, or choose another --out")
    if not (isinstance(args.examples, int) and args.examples >= 0):
        problems.append(f"--examples must be an integer >= 0, got {args.examples!r}")
    return problems


def cmd_chc(args) -> int:
    """Check the flags, then build the hierarchy and write it (and, from a corpus, its report and picture)."""
    problems = _problems(args)
    cfg = None
    try:
        cfg = chc_config(args)
    except ConfigError as e:
        problems += _as_chc_flags(e.problems)
    if problems:
        raise CLIError("invalid input:\n  - " + "\n  - ".join(problems))
    cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "chc-cache")
    t0 = time.perf_counter()
    if args.corpus is not None:
        written, h = _from_corpus(args, cfg, cache_dir)
    else:
        h = _from_captions(args, cfg, cache_dir)
        from ..chc import save_hierarchy

        written = [save_hierarchy(h, args.out)]
    h["timings_s"]["total_s"] = time.perf_counter() - t0
    from ..chc import summary

    print(summary(h))
    print(f"wrote {', '.join(str(p) for p in written)} ({h['timings_s']['total_s']:.1f} s)")
    return 0


def _as_chc_flags(problems: list[str]) -> list[str]:
    """CHCConfig's problems in this command's flag words (``batch_size`` is ``--encode-batch-size`` here)."""
    renamed = {"batch_size": "--encode-batch-size", "cluster_selection_method": "--cluster-selection"}
    out = []
    for p in problems:
        name, _, rest = p.partition(" ")
        out.append(f"{renamed.get(name, '--' + name.replace('_', '-'))} {rest}" if name.isidentifier() and rest else p)
    return out


def _from_captions(args, cfg, cache_dir) -> dict:
    """The hierarchy of ``--captions`` (and ``--image-features``): the files are read before torch is imported."""
    from ..chc import load_image_features, read_captions

    captions, ids = read_captions(args.captions)
    if args.limit is not None:
        captions = captions[: args.limit]
        ids = ids[: args.limit] if ids is not None else None
    feats = None
    if args.image_features:
        order = list(dict.fromkeys(ids)) if ids is not None else None
        feats = load_image_features(args.image_features, order)
    from ..chc import build_hierarchy

    return build_hierarchy(captions, ids, feats, cfg, cache_dir=cache_dir)


def _from_corpus(args, cfg, cache_dir):
    """The corpus read and checked (before torch is imported), its CHC, and the files written."""
    from ..chc import read_corpus

    corpus = read_corpus(args.corpus, captions=args.captions, images=args.images, skip_missing=args.skip_missing)
    from ..backbones import build_backbone
    from ..chc import corpus_chc, write_hierarchy

    if args.skip_unreadable:
        corpus, bad = corpus.without_unreadable()
        if bad:
            print(f"left out {len(bad)} unreadable images (--skip-unreadable): {bad[:5]}", file=sys.stderr)
    run = corpus_chc(corpus, build_backbone(args.backbone or DEFAULT_BACKBONE), cfg, cache_dir=cache_dir)
    written = write_hierarchy(run.hierarchy, corpus, args.out, overwrite=args.overwrite, examples=args.examples)
    return written, run.hierarchy
