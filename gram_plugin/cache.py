"""On-disk cache of frozen image-tower features.

When only text prompts learn (CoOp), the image tower's output never changes during training, so the
features of a dataset are computed once (batched, with a progress bar) and stored as a safetensors
file. The key hashes everything the features depend on: backbone name, weights identity, the
transform's description, and the file list in order (path, SHA-256 of the file's bytes, label). An
image edited in place is a new key even at the same size and mtime, so a stale file is never read
(``prune`` removes files of older keys); hashing the bytes costs what benchmarks/README.md measures.

Each file also records a SHA-256 binding every row to its image's hash, in order: a file whose rows
were reordered or damaged (even with its tensor checksums recomputed), or that holds NaN / Inf, is
named in a warning and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from .safeio import CacheError, file_sha256, load_tensors, save_tensors

FEATURES_KEY = "features"
FILE_KIND = "feature-cache"


def image_digests(dataset) -> list[str | None]:
    """SHA-256 of each image file's bytes, in dataset order (``None`` for a file that cannot be read)."""
    out: list[str | None] = []
    for it in dataset.items:
        try:
            out.append(file_sha256(it.path))
        except OSError:
            out.append(None)
    return out


def cache_key(backbone, dataset, digests: list[str | None] | None = None) -> tuple[str, dict]:
    """(hex key, the JSON-able description it hashes) for ``dataset`` encoded by ``backbone``.

    ``digests``: :func:`image_digests` of the dataset, when the caller has them already.
    """
    digests = image_digests(dataset) if digests is None else digests
    files = hashlib.sha256()
    for it, digest in zip(dataset.items, digests):
        files.update(json.dumps([it.path, digest, it.label]).encode())
    parts = {
        "backbone": backbone.name,
        "weights": backbone.weights_id(),
        "transform": repr(dataset.transform),
        "n_files": len(dataset.items),
        "files": files.hexdigest(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return key, parts


def rows_sha256(digests: list[str | None], features: torch.Tensor) -> str:
    """SHA-256 binding row i of ``features`` to image i's hash: any reordering or changed row alters it."""
    h = hashlib.sha256()
    rows = features.detach().contiguous().cpu()
    for digest, row in zip(digests, rows):
        h.update(str(digest).encode())
        h.update(row.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        """The cache file for a content key (see :func:`cache_key`)."""
        return self.root / f"features-{key}.safetensors"

    def features(self, backbone, dataset) -> torch.Tensor:
        """Image features (N, embed_dim) in dataset order, from disk if the key matches.

        A cache file that is damaged, reordered or non-finite is named in a warning and recomputed.
        Raises ``CacheError`` when the image tower itself gives non-finite features (nothing is cached).
        """
        digests = image_digests(dataset)
        key, parts = cache_key(backbone, dataset, digests)
        path = self.path_for(key)
        if path.exists():
            try:
                tensors, meta = load_tensors(path, what="feature cache", error=CacheError, kind=FILE_KIND)
                problem = _cache_problem(tensors.get(FEATURES_KEY), meta, parts, digests)
                message = f"feature cache {path} {problem}"
            except CacheError as e:  # unreadable, or a checksum mismatch: the message names the file
                problem = message = str(e)
            if problem is None:
                self.hits += 1
                self.last_status = "hit"
                return tensors[FEATURES_KEY]
            warnings.warn(f"{message}: recomputing", stacklevel=2)
        self.misses += 1
        self.last_status = "miss"
        feats = encode_dataset(backbone, dataset, self.batch_size, self.progress)
        bad = (~torch.isfinite(feats).all(dim=1)).nonzero().flatten().tolist() if feats.numel() else []
        if bad:
            raise CacheError(f"image tower {backbone.name} gave non-finite features for {len(bad)} of {len(dataset)} "
                             f"images of {dataset.name} (first: {dataset.items[bad[0]].path}); nothing was cached: "
                             "check the backbone's weights")
        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {FEATURES_KEY: feats},
                     {"parts": parts, "dataset": dataset.name, "rows": rows_sha256(digests, feats)}, kind=FILE_KIND)
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


def _cache_problem(feats: torch.Tensor | None, meta: dict, parts: dict, digests: list) -> str | None:
    """Why a cache file that loaded cannot be used for these images (``None``: it can)."""
    if feats is None:
        return f"holds no {FEATURES_KEY!r} tensor"
    if meta.get("parts") != parts:
        return "was written for other images or another backbone"
    if feats.dim() != 2 or feats.shape[0] != len(digests):
        return f"has {tuple(feats.shape)} features for {len(digests)} images"
    if not bool(torch.isfinite(feats).all()):
        return "holds non-finite values (NaN or Inf)"
    if meta.get("rows") != rows_sha256(digests, feats):
        return "rows do not match its images (reordered or damaged)"
    return None


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
