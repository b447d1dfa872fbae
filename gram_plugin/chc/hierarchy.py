"""The CHC pipeline end to end (:func:`build_hierarchy`), the hierarchy file and its summary.

The stages are called through their modules (``reduction.reduce_umap``, ...) so that a benchmark can
wrap one stage's function to time it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..safeio import atomic_write_bytes
from . import domains, embedding, naming, sampling
from .config import CHCConfig, CHCError, _progress
from .embedding import _model_identity, captions_hash

FORMAT = "gram-chc/1"

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
    captions = list(captions)
    if not captions:
        raise CHCError("no captions given")
    scaled = (config or CHCConfig()).scaled_fields()
    cfg = (config or CHCConfig()).resolved(len(captions))
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
        embeddings = embedding.embed_captions(captions, cfg.model, cache_dir, cfg.batch_size, cfg.device, cfg.progress)
    elif len(embeddings) != len(captions):
        raise CHCError(f"{len(embeddings)} embeddings for {len(captions)} captions")
    timings["embed_s"] = time.perf_counter() - t

    _progress(f"UMAP to {cfg.umap_components}-d + HDBSCAN", cfg.progress)
    # exact up to cfg.fit_sample captions; above: fit on a sample, the rest assigned (sampling.py)
    reduced, labels, fit = sampling.reduce_and_cluster(np.asarray(embeddings, dtype=np.float32), cfg)
    timings.update({f"{stage}_s": s for stage, s in fit.pop("seconds").items()})
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
        in_topic = topic_of_caption >= 0
        sums = np.zeros((len(cluster_ids), reduced.shape[1]))
        np.add.at(sums, topic_of_caption[in_topic], reduced[in_topic])
        centroids = sums / np.bincount(topic_of_caption[in_topic], minlength=len(cluster_ids))[:, None]
        noise_rows = np.nonzero(noise_mask)[0]
        for start in range(0, len(noise_rows), 4096):  # noise x topics distances a block at a time
            rows = noise_rows[start:start + 4096]
            topic_of_caption[rows] = ((reduced[rows, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
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
    # members of every topic in one pass (a per-topic scan is n_captions x n_topics: hours at CC3M scale)
    caption_members = _members(topic_of_caption, n_topics)
    item_members = _members(item_topic, n_topics)
    docs = [" ".join(captions[c] for c in caption_members[l]) for l in range(n_topics)]
    vocab, scores, counts = naming.ctfidf(docs)
    ranked, scoring = naming.rank_words(vocab, scores, counts, cfg.top_words)
    caption_sizes = [len(m) for m in caption_members]
    names = naming.unique_names(ranked, caption_sizes)
    timings["ctfidf_s"] = time.perf_counter() - t

    t = time.perf_counter()
    topics = []
    from tqdm.auto import tqdm

    for l in tqdm(range(n_topics), desc="k-means domains", disable=not cfg.progress or feats is None):
        items = item_members[l]
        if feats is not None and len(items):
            dom = domains.kmeans_domains(feats[items], cfg.n_domains, cfg.seed)
        else:
            dom = np.zeros(len(items), dtype=np.int64)
        topics.append({
            "id": l,
            "name": names[l],
            "words": ranked[l],
            "n_captions": caption_sizes[l],
            "captions": caption_members[l].tolist(),
            "items": items.tolist(),
            "domains": [items[dom == d].tolist() for d in range(int(dom.max()) + 1 if len(dom) else 0)],
        })
    timings["kmeans_s"] = time.perf_counter() - t

    return {
        "format": FORMAT,
        "config": asdict(cfg),
        "scaled_settings": {name: getattr(cfg, name) for name in scaled},  # fields set by CHCConfig.resolved
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
        "fit": fit,
        "topics": topics,
        "timings_s": timings,
    }


def _members(topic_of: np.ndarray, n_topics: int) -> list[np.ndarray]:
    """Indices (ascending) with each topic id 0..n_topics-1 (-1 = none), by one stable sort."""
    order = np.argsort(topic_of, kind="stable")
    bounds = np.searchsorted(topic_of[order], np.arange(n_topics + 1))
    return [order[bounds[l]:bounds[l + 1]] for l in range(n_topics)]


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
