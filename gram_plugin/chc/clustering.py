"""HDBSCAN topics over the UMAP-reduced caption embeddings (label -1 = noise)."""

from __future__ import annotations

import numpy as np

from .config import CHCConfig, CHCError

def cluster_hdbscan(points: np.ndarray, cfg: CHCConfig) -> np.ndarray:
    import hdbscan

    cfg = cfg.resolved(len(points))  # unset sizes scale with the number of points (one per caption)
    if len(points) < cfg.min_cluster_size:
        raise CHCError(
            f"only {len(points)} points, fewer than min_cluster_size={cfg.min_cluster_size}; "
            "lower min_cluster_size or add captions"
        )
    labels = hdbscan.HDBSCAN(
        min_cluster_size=cfg.min_cluster_size,
        min_samples=cfg.min_samples,
        cluster_selection_method=cfg.cluster_selection_method,
    ).fit_predict(points)
    return np.asarray(labels, dtype=np.int64)
