"""The corpus images seen by a backbone: frozen image-tower features (cached), and task sources over them.

Features come from :class:`gram_plugin.cache.FeatureCache` (the same cache and key as the labelled
datasets': backbone, weights, transform, the images' bytes), so a corpus is encoded once per backbone. CHC's visual domains are k-means clusters of these features inside each topic.

Tasks (:func:`corpus_task_source`) draw the corpus images either as those cached features (the fast
path, right when only text prompts are learned: the frozen tower's output never changes) or as
images (a visual / pixel prompt is learned, or the trainer needs pixels), loaded through a
dataset whose transform is the model's input transform.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .config import CHCError
from .corpus import Corpus
from .tasks import CHCTaskSource


def corpus_features(corpus: Corpus, backbone, cache_dir: str | os.PathLike, batch_size: int = 64,
                    progress: bool = True) -> torch.Tensor:
    """(n_images, embed_dim) frozen image-tower features of the corpus images, row = item index.

    Read from ``cache_dir`` when a :class:`~gram_plugin.cache.FeatureCache` file for this backbone,
    transform and file list is there; computed and saved otherwise.

    Raises:
        gram_plugin.data.DataError: an image cannot be decoded (the message names it; drop such
            images first with :meth:`Corpus.without_unreadable`).
    """
    from ..cache import FeatureCache

    return FeatureCache(cache_dir, batch_size=batch_size, progress=progress).features(
        backbone, corpus.dataset(backbone.preprocess))


def corpus_task_source(hierarchy: dict, corpus: Corpus, *, features: torch.Tensor | None = None,
                       transform: Callable | None = None, dataset=None, n_way: int = 5, shots: int = 1,
                       queries: int = 4, support: str = "one-domain") -> CHCTaskSource:
    """GRAM's CHC tasks over the corpus images: give ``features`` (fast path, batches carry
    ``"features"``) or image loading, by ``transform`` (e.g. the backbone's ``preprocess``) or by a
    ready ``dataset`` whose item i is corpus image i (e.g. a trainer's decoded-once dataset).
    ``support``: ``"one-domain"`` (GRAM) or ``"any-domain"`` (no domain shift; see :class:`CHCTaskSource`).

    Raises:
        CHCError: the hierarchy was not built from this corpus, or too few topics can give
            ``shots`` + ``queries`` images for ``n_way`` (the message names the knobs, including
            ``min_cluster_size`` when the hierarchy's ``config`` is known).
    """
    if hierarchy.get("items_are") != "images" or hierarchy.get("n_items") != len(corpus):
        raise CHCError(f"the hierarchy has {hierarchy.get('n_items')} {hierarchy.get('items_are')} but the corpus "
                       f"{corpus.root} has {len(corpus)} images: build the hierarchy from this corpus")
    if (features is None) + (transform is None) + (dataset is None) != 2:
        raise ValueError("corpus_task_source needs exactly one of features=, transform= or dataset=")
    load_image = None
    if features is None:
        dataset = dataset if dataset is not None else corpus.dataset(transform)
        if len(dataset) != len(corpus):
            raise ValueError(f"dataset has {len(dataset)} images, the corpus {len(corpus)}")
        load_image = dataset.load_image
    cfg = hierarchy.get("config") or {}
    info = {"corpus": str(corpus.root), "corpus_format": corpus.format, "n_images": len(corpus),
            "n_captions": corpus.n_captions, "n_topics": hierarchy["n_topics"],
            "chc": {k: cfg.get(k) for k in ("min_cluster_size", "min_samples", "n_domains", "seed")},
            "image_features": (hierarchy.get("image_features") or {}).get("backbone")}
    try:
        return CHCTaskSource(hierarchy, features=features, load_image=load_image, n_way=n_way, shots=shots,
                             queries=queries, support=support, info=info)
    except CHCError as e:
        mcs = cfg.get("min_cluster_size")
        hint = (f"; or build more, smaller topics: lower min_cluster_size (--min-cluster-size, this hierarchy "
                f"used {mcs}) or add images to the corpus") if mcs is not None else ""
        raise CHCError(f"{e}{hint}") from None


class ImageTower:
    """What :class:`~gram_plugin.cache.FeatureCache` needs from a backbone, around any frozen image encoder
    (e.g. a Dassl trainer's CLIP ``clip_model.visual``), so a corpus is encoded and cached the same way.

    Args:
        encode_image: preprocessed images (N, 3, H, W) -> features (N, D); run under ``no_grad``.
        name: the cache key's backbone name (say what the encoder and its input are).
        weights_id: identity of the weights for the cache key (e.g. ``backbones.openclip._state_digest(module)``).
        preprocess: the transform for datasets that have none (a ready dataset brings its own).
        device: where images go before ``encode_image``.
    """

    def __init__(self, encode_image: Callable, name: str, weights_id: str, preprocess: Callable | None = None,
                 device: str | torch.device = "cpu"):
        self.encode_image, self.name, self._weights_id = encode_image, name, weights_id
        self.preprocess, self.device = preprocess, torch.device(device)

    def weights_id(self) -> str:
        return self._weights_id

    def parameters(self):  # encode_dataset moves the images to the first parameter's device
        yield torch.empty(0, device=self.device)
