"""On-disk cache of frozen image-tower features.

When only text prompts learn (CoOp), the image tower's output never changes during training, so the
features of a dataset are computed once (batched, with a progress bar) and stored as a safetensors
file. The key hashes everything the features depend on: backbone name, weights identity, the
transform's description, and the file list (path, label, size, mtime). Change any of them and the
key changes, so the stale file is never read (``prune`` removes files of older keys).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .safeio import CacheError, load_tensors, save_tensors

FEATURES_KEY = "features"
FILE_KIND = "feature-cache"


def _file_entry(path: str) -> list:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, -1, -1]


def cache_key(backbone, dataset) -> tuple[str, dict]:
    """(hex key, the JSON-able description it hashes) for ``dataset`` encoded by ``backbone``."""
    files = hashlib.sha256()
    for it in dataset.items:
        files.update(json.dumps([*_file_entry(it.path), it.label]).encode())
    parts = {
        "backbone": backbone.name,
        "weights": backbone.weights_id(),
        "transform": repr(dataset.transform),
        "n_files": len(dataset.items),
        "files": files.hexdigest(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return key, parts


class FeatureCache:
    """Features of datasets under ``root``; counts ``hits`` and ``misses``."""

    def __init__(self, root: str | os.PathLike, batch_size: int = 64, progress: bool = True):
        self.root = Path(root)
        self.batch_size = batch_size
        self.progress = progress
        self.hits = 0
        self.misses = 0
        self.last_status: str | None = None

    def path_for(self, key: str) -> Path:
        return self.root / f"features-{key}.safetensors"

    def features(self, backbone, dataset) -> torch.Tensor:
        """Image features (N, embed_dim) in dataset order, from disk if the key matches."""
        key, parts = cache_key(backbone, dataset)
        path = self.path_for(key)
        if path.exists():
            try:
                tensors, meta = load_tensors(path, what="feature cache", error=CacheError, kind=FILE_KIND)
                feats = tensors[FEATURES_KEY]
                if meta.get("parts") == parts and feats.shape[0] == len(dataset):
                    self.hits += 1
                    self.last_status = "hit"
                    return feats
            except (CacheError, KeyError):
                pass  # a damaged cache file is recomputed and overwritten
        self.misses += 1
        self.last_status = "miss"
        feats = encode_dataset(backbone, dataset, self.batch_size, self.progress)
        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {FEATURES_KEY: feats}, {"parts": parts, "dataset": dataset.name}, kind=FILE_KIND)
        return feats

    def attach(self, backbone, dataset):
        """``dataset`` backed by its cached features (batches then carry ``"features"``)."""
        return dataset.with_features(self.features(backbone, dataset))

    def prune(self, keep: list[str] | None = None) -> int:
        """Delete cache files whose key is not in ``keep`` (all when ``None``); returns how many."""
        keep = set(keep or [])
        n = 0
        for p in self.root.glob("features-*.safetensors"):
            if p.stem[len("features-"):] not in keep:
                p.unlink()
                n += 1
        return n


@torch.no_grad()
def encode_dataset(backbone, dataset, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Run the frozen image tower over every image of ``dataset`` in batches."""
    from tqdm.auto import tqdm

    if dataset.transform is None:
        dataset = dataset.with_transform(backbone.preprocess)
    device = next(backbone.parameters()).device if hasattr(backbone, "parameters") else torch.device("cpu")
    out = []
    starts = range(0, len(dataset), batch_size)
    for s in tqdm(starts, desc=f"features {dataset.name}", unit="batch", disable=not progress, dynamic_ncols=True):
        idx = list(range(s, min(s + batch_size, len(dataset))))
        images = torch.stack([dataset.load_image(i) for i in idx]).to(device)
        out.append(backbone.encode_image(images).float().cpu())
    if not out:
        return torch.empty(0, backbone.embed_dim)
    return torch.cat(out)
