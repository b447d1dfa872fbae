"""HDBSCAN's settings scaled with the number of captions (what an unset ``min_cluster_size`` /
``min_samples`` of :class:`~gram_plugin.chc.CHCConfig` becomes).

HDBSCAN's ``min_cluster_size`` is an absolute count, so one value cannot suit every corpus: 100 (chosen
on Flickr8k's 40,961 captions: 80 topics) leaves the 5,000 captions of flickr8k-1k with 2 topics, where
20 (with min_samples 3) gives 77-82 topics, ~50 of which can give 4 support images from one visual
domain plus 4 queries. The rule keeps the topic size proportional to the corpus through those two
measured points and fixed at 100 above 25,000 captions (a larger corpus then gives more topics;
not measured above 41k). The measurements that chose it: benchmarks/CHC.md, "CHC settings for a
small corpus".
"""

from __future__ import annotations

CAPTIONS_PER_MIN_CLUSTER = 250  # min_cluster_size = n_captions / 250, rounded ...
MIN_CLUSTER_SIZE_RANGE = (5, 100)  # ... and kept in [5, 100] (100 from 25,000 captions on)
MIN_SAMPLES_RANGE = (3, 10)  # min_samples = min_cluster_size / 10, kept in [3, 10]

SCALING_HELP = (f"default: scaled with the number of captions n: round(n / {CAPTIONS_PER_MIN_CLUSTER}) kept in "
                f"[{MIN_CLUSTER_SIZE_RANGE[0]}, {MIN_CLUSTER_SIZE_RANGE[1]}], min_samples = that / 10 kept in "
                f"[{MIN_SAMPLES_RANGE[0]}, {MIN_SAMPLES_RANGE[1]}] (5,000 captions: 20 and 3; 40,000: 100 and 10)")


def _clamp(v: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], v))


def scaled_min_cluster_size(n_captions: int) -> int:
    """HDBSCAN ``min_cluster_size`` for a corpus of ``n_captions`` (see the module docstring)."""
    return _clamp(round(n_captions / CAPTIONS_PER_MIN_CLUSTER), MIN_CLUSTER_SIZE_RANGE)


def scaled_min_samples(min_cluster_size: int) -> int:
    """HDBSCAN ``min_samples`` for that ``min_cluster_size``."""
    return _clamp(round(min_cluster_size / 10), MIN_SAMPLES_RANGE)
