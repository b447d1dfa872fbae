"""HDBSCAN topics over the UMAP-reduced caption embeddings (label -1 = noise)."""

from __future__ import annotations

import numpy as np

from .config import CHCConfig, CHCError

def fit_hdbscan(points: np.ndarray, cfg: CHCConfig, prediction_data: bool = False):
    """The fitted ``hdbscan.HDBSCAN`` (``prediction_data``: ready for ``hdbscan.approximate_predict``)."""
    import hdbscan

    cfg = cfg.resolved(len(points))  # unset sizes scale with the number of points (one per caption)
    if len(points) < cfg.min_cluster_size:
        raise CHCError(
            f"only {len(points)} points, fewer than min_cluster_size={cfg.min_cluster_size}; "
            "lower min_cluster_size or add captions"
        )
    return hdbscan.HDBSCAN(
        min_cluster_size=cfg.min_cluster_size,
        min_samples=cfg.min_samples,
        cluster_selection_method=cfg.cluster_selection_method,
        prediction_data=prediction_data,
    ).fit(points)


def cluster_hdbscan(points: np.ndarray, cfg: CHCConfig) -> np.ndarray:
    return np.asarray(fit_hdbscan(points, cfg).labels_, dtype=np.int64)
