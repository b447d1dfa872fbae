"""Visual domains: k-means on the image features of one topic's items."""

from __future__ import annotations

import numpy as np

def kmeans_domains(features: np.ndarray, n_domains: int, seed: int) -> np.ndarray:
    """k-means labels, renumbered by first appearance so equal partitions get equal labels."""
    from sklearn.cluster import KMeans

    k = min(n_domains, len(features))
    if k <= 1 or len(np.unique(features, axis=0)) < k:
        return np.zeros(len(features), dtype=np.int64)
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    relabel = {}
    for lab in raw:
        relabel.setdefault(int(lab), len(relabel))
    return np.array([relabel[int(lab)] for lab in raw], dtype=np.int64)
