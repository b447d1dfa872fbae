"""CHC's settings (:class:`CHCConfig`), its error (:class:`CHCError`) and the progress line every stage prints."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..config import integer_at_least, one_of, raise_problems
from ..errors import GramPluginError

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class CHCError(GramPluginError, ValueError):
    """The clustering cannot go on with these inputs / settings (the message says which knob to turn)."""


@dataclass
class CHCConfig:
    """Settings of :func:`build_hierarchy` (defaults chosen on Flickr8k captions, see benchmarks/CHC.md)."""

    model: str = DEFAULT_MODEL  # sentence-transformers name or path; the default loads offline
    batch_size: int = 256  # sentences per encoder batch
    umap_neighbors: int = 15
    umap_components: int = 5
    umap_min_dist: float = 0.0
    # UMAP's neighbour graph: "exact" = brute-force cosine k-NN by chunked matmul (all cores,
    # deterministic, 2x faster than NN-descent on 40k captions here); "nndescent" = UMAP's own
    # approximate search, single-threaded under a seed; "auto" = exact up to exact_knn_max points.
    knn: str = "auto"
    exact_knn_max: int = 100_000
    min_cluster_size: int = 100  # HDBSCAN
    min_samples: int | None = 10  # HDBSCAN (None = min_cluster_size)
    cluster_selection_method: str = "eom"  # or "leaf" (more, smaller topics)
    noise: str = "drop"  # "drop" or "nearest"
    n_domains: int = 3  # k of k-means inside each topic
    top_words: int = 10
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        # every problem at once, each field checked for its type before its range (a string never
        # reaches a comparison: one ConfigError, no TypeError)
        problems = []
        for name, low in (("batch_size", 1), ("umap_neighbors", 2), ("umap_components", 1), ("min_cluster_size", 2),
                          ("n_domains", 1), ("top_words", 1), ("exact_knn_max", 1), ("seed", 0)):
            problems += integer_at_least(name, getattr(self, name), low)
        if self.min_samples is not None:
            problems += [p.replace("must be", "must be None or") for p in integer_at_least("min_samples", self.min_samples, 1)]
        md = self.umap_min_dist
        if not (isinstance(md, (int, float)) and not isinstance(md, bool) and 0 <= md <= 1):
            problems.append(f"umap_min_dist must be a number in [0, 1], got {md!r}")
        problems += one_of("knn", self.knn, ("auto", "exact", "nndescent"))
        problems += one_of("noise", self.noise, ("drop", "nearest"))
        problems += one_of("cluster_selection_method", self.cluster_selection_method, ("eom", "leaf"))
        for name in ("model", "device"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                problems.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.progress, bool):
            problems.append(f"progress must be True or False, got {self.progress!r}")
        raise_problems("CHCConfig", problems)


def _progress(msg: str, on: bool):
    if on:
        print(f"[chc] {msg}", file=sys.stderr, flush=True)
