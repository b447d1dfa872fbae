"""CHC beyond ``fit_sample`` captions (CC3M's 3.1M): UMAP and HDBSCAN fit on a sample, the rest assigned.

Exact CHC fits UMAP and HDBSCAN on every caption: UMAP's neighbour search and layout grow faster than
linearly and hold several copies of the data (benchmarks/CHC.md's projection to 3M). Above
``CHCConfig.fit_sample`` captions :func:`reduce_and_cluster` instead

1. draws a seeded sample of ``fit_sample`` captions and runs the exact path on it: UMAP (exact cosine
   k-NN graph) and HDBSCAN, with ``min_cluster_size`` / ``min_samples`` -- as given, or resolved for the
   whole corpus by :meth:`CHCConfig.resolved` when left ``None`` -- scaled by the sampled fraction so
   that a topic needs as large a share of the corpus as the exact run asks for (at least 2);
2. places every other caption, ``assign_chunk`` at a time (bounded memory): its ``umap_neighbors``
   nearest sampled captions by cosine (``assign_knn="auto"``: brute force on a GPU,
   :func:`nearest_in_sample`; on a CPU UMAP's own NN-descent index of the sample, :class:`SampleIndex`),
   UMAP's own transform initialisation (the neighbours' UMAP coordinates averaged with UMAP's fuzzy
   membership weights, :func:`transform_coords`; no further layout epochs: the coordinates
   ``build_hierarchy`` returns), and its topic: the membership-weighted vote of the neighbours' topics
   (``assign="knn"``, the default) or ``hdbscan.approximate_predict`` on those coordinates
   (``assign="umap"``, which left twice the exact path's noise on the real captions).

The sample's topics are the topics; the rest joins them (or noise). The agreement with the exact path
(adjusted Rand index on the real Flickr8k captions) and the cost growth: benchmarks/README.md, "Issue 26".
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .config import CHCConfig, _progress


def resolve_device(device: str) -> str:
    """``"auto"``: the GPU when torch sees one, else the CPU; any other value is returned as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``range(n)`` drawn without replacement under ``seed``, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def scaled(value: int | None, fraction: float) -> int | None:
    """A count of captions on the whole corpus -> the same share of a sample (at least 2)."""
    return None if value is None else max(2, int(round(value * fraction)))


def nearest_in_sample(queries: np.ndarray, sample: np.ndarray, k: int, device: str = "cpu",
                      chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``sample`` for every row of ``queries`` by cosine distance (rows
    L2-normalised here): (indices (m, k) int64, distances (m, k) float32), brute force on ``device`` in
    chunks of ``chunk`` queries (default: 256 MiB of similarities on the CPU, 2 GiB on a GPU)."""
    dev = torch.device(device)
    if chunk is None:
        chunk = max(1, (2**31 if dev.type == "cuda" else 2**28) // (4 * max(1, len(sample))))
    s = torch.nn.functional.normalize(torch.as_tensor(sample, dtype=torch.float32).to(dev), dim=1)
    idx = np.empty((len(queries), k), dtype=np.int64)
    dist = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        q = torch.nn.functional.normalize(torch.as_tensor(queries[start:start + chunk], dtype=torch.float32).to(dev), dim=1)
        top, i = (q @ s.T).topk(k, dim=1)
        idx[start:start + chunk] = i.cpu().numpy()
        dist[start:start + chunk] = (1.0 - top).clamp_min_(0.0).cpu().numpy()
    return idx, dist


class SampleIndex:
    """UMAP's own approximate neighbour search (pynndescent's NN-descent index, cosine) over the sample:
    what the assignment uses on a CPU, where a brute-force search of millions of captions against the
    sample grows as captions x sample (benchmarks/README.md, "Issue 26")."""

    def __init__(self, sample: np.ndarray, seed: int):
        from pynndescent import NNDescent

        self.index = NNDescent(sample, metric="cosine", n_neighbors=30, random_state=seed, low_memory=True)
        self.index.prepare()

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx, dist = self.index.query(np.ascontiguousarray(queries, dtype=np.float32), k=k)
        return idx.astype(np.int64), np.maximum(dist, 0.0).astype(np.float32)


def membership_weights(dists: np.ndarray, n_neighbors: int) -> np.ndarray:
    """UMAP's transform weights of each query's neighbours: fuzzy memberships exp(-(d - rho) / sigma)
    (``smooth_knn_dist`` with local connectivity 0, as ``UMAP.transform``), each row summing to 1."""
    from umap.umap_ import smooth_knn_dist

    sigmas, rhos = smooth_knn_dist(dists, float(n_neighbors), local_connectivity=0.0)
    w = np.exp(-np.maximum(dists - rhos[:, None], 0.0) / sigmas[:, None])
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def transform_coords(idx: np.ndarray, weights: np.ndarray, sample_coords: np.ndarray) -> np.ndarray:
    """UMAP coordinates of new points: their neighbours' coordinates averaged with ``weights``."""
    return np.einsum("mk,mkc->mc", weights, sample_coords[idx]).astype(np.float32)


def vote(idx: np.ndarray, weights: np.ndarray, sample_labels: np.ndarray) -> np.ndarray:
    """Each query's label: the neighbours' label (noise -1 included) with the largest summed weight, the
    smallest such label on a tie. Memory (m, k): a queries x topics table would be 15 GB per chunk of
    65,536 captions at the ~30,000 topics of 3.1M captions."""
    labels = sample_labels[idx]  # (m, k)
    scores = np.zeros(labels.shape, dtype=np.float64)  # summed weight of each neighbour's label
    for i in range(labels.shape[1]):
        scores += weights[:, i:i + 1].astype(np.float64) * (labels == labels[:, i:i + 1])
    best = scores == scores.max(1, keepdims=True)
    return np.where(best, labels, np.iinfo(np.int64).max).min(1).astype(np.int64)


def reduce_and_cluster(emb: np.ndarray, cfg: CHCConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """UMAP coordinates (n, umap_components) and HDBSCAN labels (n,) of every caption; ``info`` says
    what ran. Up to ``cfg.fit_sample`` captions (or ``fit_sample=0``): the exact path. Above: the
    sampled path of the module docstring."""
    import hdbscan

    from . import clustering, reduction

    n = len(emb)
    cfg = cfg.resolved(n)  # HDBSCAN's unset sizes for the whole corpus (scaling.py), scaled to the sample below
    seconds = {}
    t = time.perf_counter()
    if not cfg.fit_sample or n <= cfg.fit_sample:
        reduced = reduction.reduce_umap(emb, cfg)
        seconds["umap"], t = time.perf_counter() - t, time.perf_counter()
        labels = clustering.cluster_hdbscan(reduced, cfg)
        seconds["hdbscan"] = time.perf_counter() - t
        return reduced, labels, {"path": "exact", "n": n, "seconds": seconds}
    device = resolve_device(cfg.device)
    picked = sample_indices(n, cfg.fit_sample, cfg.seed)
    fraction = cfg.fit_sample / n
    sample_cfg = CHCConfig(**{**cfg.__dict__, "min_cluster_size": scaled(cfg.min_cluster_size, fraction),
                              "min_samples": scaled(cfg.min_samples, fraction), "progress": False})
    _progress(f"UMAP + HDBSCAN fit on a sample of {cfg.fit_sample} of {n} captions "
              f"(min_cluster_size {sample_cfg.min_cluster_size}, min_samples {sample_cfg.min_samples})", cfg.progress)
    sample_emb = np.ascontiguousarray(emb[picked], dtype=np.float32)
    sample_coords = reduction.reduce_umap(sample_emb, sample_cfg)
    seconds["umap"], t = time.perf_counter() - t, time.perf_counter()
    clusterer = clustering.fit_hdbscan(sample_coords, sample_cfg, prediction_data=cfg.assign == "umap")
    sample_labels = np.asarray(clusterer.labels_, dtype=np.int64)
    seconds["hdbscan"], t = time.perf_counter() - t, time.perf_counter()

    reduced = np.empty((n, cfg.umap_components), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    reduced[picked], labels[picked] = sample_coords, sample_labels
    rest = np.setdiff1d(np.arange(n), picked, assume_unique=True)
    search = cfg.assign_knn if cfg.assign_knn != "auto" else ("exact" if device.startswith("cuda") else "nndescent")
    index = SampleIndex(sample_emb, cfg.seed) if search == "nndescent" else None
    seconds["index"], t = time.perf_counter() - t, time.perf_counter()
    _progress(f"assigning {len(rest)} captions to the sample's {int(sample_labels.max()) + 1} topics "
              f"({cfg.assign}; neighbours: {search}{' on ' + device if index is None else ''})", cfg.progress)
    for start in range(0, len(rest), cfg.assign_chunk):
        rows = rest[start:start + cfg.assign_chunk]
        if index is None:
            idx, dist = nearest_in_sample(emb[rows], sample_emb, cfg.umap_neighbors, device)
        else:
            idx, dist = index.query(emb[rows], cfg.umap_neighbors)
        w = membership_weights(dist, cfg.umap_neighbors)
        reduced[rows] = transform_coords(idx, w, sample_coords)
        if cfg.assign == "umap":
            labels[rows] = np.asarray(hdbscan.approximate_predict(clusterer, reduced[rows])[0], dtype=np.int64)
        else:
            labels[rows] = vote(idx, w, sample_labels)
    seconds["assign"] = time.perf_counter() - t
    return reduced, labels, {"path": "sampled", "n": n, "fit_sample": cfg.fit_sample, "assign": cfg.assign,
                             "device": device, "assign_knn": search, "sample_min_cluster_size": sample_cfg.min_cluster_size,
                             "sample_min_samples": sample_cfg.min_samples, "seconds": seconds}
