"""GRAM's CHC on an image-caption corpus, end to end: corpus -> image features -> hierarchy -> files -> tasks.

    corpus = read_corpus("flickr8k-1k")                          # images + captions, checked
    run = corpus_chc(corpus, backbone, cache_dir="cache")        # features (cached) + hierarchy
    write_hierarchy(run.hierarchy, corpus, "out/hierarchy.json")  # + hierarchy.txt + hierarchy.png
    tasks = run.task_source(n_way=5, shots=1, queries=4)         # features: text prompts only
    tasks = run.task_source(..., transform=backbone.preprocess)  # images: visual prompts / trainers
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CHCConfig, CHCError, hierarchy_files
from .corpus import Corpus
from .hierarchy import build_hierarchy, save_hierarchy
from .images import corpus_features, corpus_task_source
from .view import describe_hierarchy, draw_hierarchy



@dataclass
class CorpusCHC:
    """A corpus, its image features and its CHC hierarchy (item i = corpus image i = feature row i)."""

    corpus: Corpus
    features: torch.Tensor | None
    hierarchy: dict

    def task_source(self, n_way: int = 5, shots: int = 1, queries: int = 4, *, transform=None, dataset=None,
                    support: str = "one-domain"):
        """GRAM's tasks over the corpus: features (default) or images (``transform`` / ``dataset``);
        see :func:`~gram_plugin.chc.images.corpus_task_source`."""
        images = transform is not None or dataset is not None
        if not images and self.features is None:
            raise CHCError("this hierarchy was built without image features: give transform= or dataset= to draw images")
        return corpus_task_source(self.hierarchy, self.corpus, features=None if images else self.features,
                                  transform=transform, dataset=dataset, n_way=n_way, shots=shots, queries=queries,
                                  support=support)


def corpus_chc(corpus: Corpus, backbone=None, config: CHCConfig | None = None,
               cache_dir: str | os.PathLike | None = None, features: torch.Tensor | None = None,
               progress: bool | None = None, features_from: dict | None = None) -> CorpusCHC:
    """CHC over the corpus captions, with visual domains from the corpus image features.

    Args:
        corpus: from :func:`~gram_plugin.chc.read_corpus`.
        backbone: whose frozen image tower gives the features (cached in ``cache_dir``); or give
            ``features`` (n_images, dim) directly; neither: text only (one domain per topic).
        config: :class:`CHCConfig` (default: its defaults, scaled with the number of captions).
        cache_dir: caption embeddings and image features are cached here (none: not cached, and
            a backbone's features are then computed in memory).
        progress: progress bars (default: ``config.progress``).
        features_from: what made the given ``features`` (recorded as the hierarchy's ``image_features``).

    Raises:
        CHCError: the clustering cannot go on (the message says which knob to turn).
        gram_plugin.data.DataError: an image cannot be decoded.
    """
    cfg = config or CHCConfig()
    progress = cfg.progress if progress is None else progress
    t0 = time.perf_counter()
    described = features_from
    if features is None and backbone is not None:
        if cache_dir is None:
            from ..cache import encode_dataset

            features = encode_dataset(backbone, corpus.dataset(backbone.preprocess), progress=progress)
        else:
            features = corpus_features(corpus, backbone, cache_dir, progress=progress)
        described = {"backbone": backbone.name, "weights": backbone.weights_id()}
    features_s = time.perf_counter() - t0
    h = build_hierarchy(corpus.captions, corpus.caption_image_ids(), features, cfg, cache_dir=cache_dir)
    h["timings_s"]["image_features_s"] = features_s
    h["corpus"] = corpus.describe()
    h["image_features"] = described
    return CorpusCHC(corpus, features, h)


def write_hierarchy(h: dict, corpus: Corpus, path: str | os.PathLike, overwrite: bool = False, examples: int = 3,
                    picture: bool = True) -> list[Path]:
    """Write the hierarchy JSON, its text report (``.txt``: topics, sizes, domains, example captions) and
    its picture (``.png``: thumbnails per topic and domain) side by side; returns the paths written.

    Raises:
        FileExistsError: one of the files exists and ``overwrite`` is False (nothing is written).
    """
    files = hierarchy_files(path)
    if not picture:
        files = files[:2]
    taken = [str(f) for f in files if f.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{', '.join(taken)} already exist: pass overwrite=True (--overwrite) to replace "
                              "them, or choose another --out")
    from ..safeio import atomic_write_text

    save_hierarchy(h, files[0])
    atomic_write_text(files[1], describe_hierarchy(h, corpus.captions, examples=examples))
    if picture:
        draw_hierarchy(h, corpus.image_paths, files[2])
    return files
