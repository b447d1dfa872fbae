"""CHC's settings (:class:`CHCConfig`), its error (:class:`CHCError`) and the progress line every stage prints."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import integer_at_least, one_of, raise_problems
from ..errors import GramPluginError
from .scaling import scaled_min_cluster_size, scaled_min_samples

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class CHCError(GramPluginError, ValueError):
    """The clustering cannot go on with these inputs / settings (the message says which knob to turn)."""


@dataclass
class CHCConfig:
    """Settings of :func:`build_hierarchy` (defaults measured on Flickr8k captions and the flickr8k-1k
    corpus, see benchmarks/CHC.md). HDBSCAN's two sizes left ``None`` scale with the corpus:
    :meth:`resolved` gives the numbers for ``n_captions`` (build_hierarchy calls it).

    Raises:
        gram_plugin.config.ConfigError: every invalid field, in one message.
    """

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
    # HDBSCAN; None (default): scaled with the number of captions by scaling.py's documented rule
    # (100 and 10 from 25,000 captions on, the values chosen on Flickr8k; 20 and 3 for 5,000)
    min_cluster_size: int | None = None
    min_samples: int | None = None
    cluster_selection_method: str = "eom"  # or "leaf" (more, smaller topics)
    noise: str = "drop"  # "drop" or "nearest"
    n_domains: int = 3  # k of k-means inside each topic
    top_words: int = 10
    seed: int = 0
    device: str = "auto"  # the encoder's (and the sampled path's neighbour search): "auto" = the GPU if present
    # Above fit_sample captions UMAP and HDBSCAN are fit on a seeded sample of that many and the rest is
    # assigned to its topics, assign_chunk at a time (gram_plugin.chc.sampling); 0 = always the exact path.
    fit_sample: int = 100_000
    # "knn": the neighbours' membership-weighted vote of topics; "umap": UMAP transform + HDBSCAN approximate_predict
    # (on the real 41k "knn" agreed better with the exact path and kept its noise share: benchmarks/README.md, issue 26)
    assign: str = "knn"
    assign_knn: str = "auto"  # the rest's neighbours in the sample: "exact" (brute force), "nndescent", "auto" (exact on a GPU)
    assign_chunk: int = 65_536
    progress: bool = True

    def __post_init__(self):
        # every problem at once, each field checked for its type before its range (a string never
        # reaches a comparison: one ConfigError, no TypeError)
        problems = []
        for name, low in (("batch_size", 1), ("umap_neighbors", 2), ("umap_components", 1), ("n_domains", 1),
                          ("top_words", 1), ("exact_knn_max", 1), ("seed", 0), ("fit_sample", 0), ("assign_chunk", 1)):
            problems += integer_at_least(name, getattr(self, name), low)
        for name, low in (("min_cluster_size", 2), ("min_samples", 1)):  # None: scaled with the corpus
            if getattr(self, name) is not None:
                problems += [p.replace("must be", "must be None or") for p in integer_at_least(name, getattr(self, name), low)]
        md = self.umap_min_dist
        if not (isinstance(md, (int, float)) and not isinstance(md, bool) and 0 <= md <= 1):
            problems.append(f"umap_min_dist must be a number in [0, 1], got {md!r}")
        problems += one_of("knn", self.knn, ("auto", "exact", "nndescent"))
        problems += one_of("noise", self.noise, ("drop", "nearest"))
        problems += one_of("cluster_selection_method", self.cluster_selection_method, ("eom", "leaf"))
        problems += one_of("assign", self.assign, ("umap", "knn"))
        problems += one_of("assign_knn", self.assign_knn, ("auto", "exact", "nndescent"))
        if all(isinstance(v, int) for v in (self.fit_sample, self.umap_neighbors)) and 0 < self.fit_sample <= self.umap_neighbors:
            problems.append(f"fit_sample must be 0 (never sample) or more than umap_neighbors={self.umap_neighbors}, "
                            f"got {self.fit_sample}")
        for name in ("model", "device"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                problems.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.progress, bool):
            problems.append(f"progress must be True or False, got {self.progress!r}")
        raise_problems("CHCConfig", problems)

    def resolved(self, n_captions: int) -> "CHCConfig":
        """This config with HDBSCAN's unset sizes filled in for a corpus of ``n_captions`` (scaling.py)."""
        mcs = self.min_cluster_size if self.min_cluster_size is not None else scaled_min_cluster_size(n_captions)
        ms = self.min_samples if self.min_samples is not None else scaled_min_samples(mcs)
        return replace(self, min_cluster_size=mcs, min_samples=ms)

    def scaled_fields(self) -> list[str]:
        """The fields :meth:`resolved` fills in (those left ``None``)."""
        return [n for n in ("min_cluster_size", "min_samples") if getattr(self, n) is None]


def _progress(msg: str, on: bool):
    if on:
        print(f"[chc] {msg}", file=sys.stderr, flush=True)


VIEW_SUFFIXES = (".txt", ".png")  # the report and the picture written beside the hierarchy JSON


def hierarchy_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`~gram_plugin.chc.write_hierarchy` writes for ``path``: the JSON, then ``.txt`` and ``.png``
    beside it (here, torch-free, so that ``gram-plugin chc`` checks its ``--out`` before anything is loaded)."""
    path = Path(path)
    return [path] + [path.with_suffix(s) for s in VIEW_SUFFIXES]
