"""UMAP reduction of the caption embeddings (with an exact cosine k-NN graph up to ``exact_knn_max`` points)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import CHCConfig, CHCError

def exact_cosine_knn(emb: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest neighbours by cosine distance, each point its own first neighbour
    (distance 0, as UMAP's own search returns it): (indices (n, k) int64, distances (n, k) float32)."""
    x = torch.nn.functional.normalize(torch.as_tensor(emb, dtype=torch.float32), dim=1)
    n = len(x)
    indices = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = float("inf")  # self first even among duplicate captions
        top, idx = sim.topk(k, dim=1)
        top[:, 0] = 1.0
        indices[start:start + chunk] = idx.numpy()
        dists[start:start + chunk] = (1.0 - top).clamp_min_(0.0).numpy()
    return indices, dists


def reduce_umap(emb: np.ndarray, cfg: CHCConfig) -> np.ndarray:
    n = len(emb)
    if n <= cfg.umap_neighbors:
        raise CHCError(
            f"only {n} points but UMAP needs more than umap_neighbors={cfg.umap_neighbors}; "
            f"lower umap_neighbors to at most {n - 1} (needs >= 2) or add captions"
        )
    if n <= cfg.umap_components + 1:
        raise CHCError(f"only {n} points for a {cfg.umap_components}-d UMAP; need at least {cfg.umap_components + 2}")
    import umap

    # Below 4096 points UMAP computes exact distances itself.
    exact = cfg.knn == "exact" or (cfg.knn == "auto" and 4096 <= n <= cfg.exact_knn_max)
    precomputed = (*exact_cosine_knn(emb, cfg.umap_neighbors), None) if exact else (None, None, None)
    with warnings.catch_warnings():
        # random_state makes UMAP single-threaded; it says so in a warning we expect.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        # Without a search index UMAP cannot .transform() new points; we never ask it to.
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        reducer = umap.UMAP(
            n_neighbors=cfg.umap_neighbors,
            n_components=cfg.umap_components,
            min_dist=cfg.umap_min_dist,
            metric="cosine",
            random_state=cfg.seed,
            verbose=False,
            tqdm_kwds={"disable": not cfg.progress},
            precomputed_knn=precomputed,
        )
        return reducer.fit_transform(emb).astype(np.float32)
