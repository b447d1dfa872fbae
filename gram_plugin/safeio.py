"""Safe file I/O under every artefact gram-plugin writes: atomic writes, checked tensor files, run-folder locks.

Every tensor file is one ``.safetensors`` file (never pickle): the tensors, a JSON metadata document
under the header key ``gram_plugin`` (with ``kind``: what the file is), and a SHA-256 of every
tensor's bytes under ``gram_plugin.sha256``, checked on load, so a flipped byte in a payload is an
error instead of a silently different number. Writes go to a temp file in the same folder, are
fsynced and renamed over the target: an interrupted write never replaces a good file.

Errors name what failed: :class:`ArtefactError` is the base; :class:`CheckpointError` and
:class:`CacheError` are raised for those files, and ``prompts.PromptInitError`` for init / prompt files.
This module imports nothing from the rest of the package but the torch-free ``errors`` and ``paths`` (it is the
bottom layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import ArtefactError
from .paths import file_problem

META_KEY = "gram_plugin"
CHECKSUM_KEY = "gram_plugin.sha256"
# the checksum table's entry for the metadata document itself (safetensors reserves this name: no tensor has it)
METADATA_CHECKSUM = "__metadata__"

# what a file is, as recorded in its metadata "kind", in words for error messages
KINDS = {
    "prompt-init": "prompt init / tuned prompt file",
    "meta-checkpoint": "meta-training checkpoint",
    "feature-cache": "feature cache file",
    "embedding-cache": "sentence-embedding cache file",
    "proxy-weights": "proxy CLIP weights file",
}


class CheckpointError(ArtefactError):
    """A meta-training checkpoint is unreadable, damaged or incomplete."""


class CacheError(ArtefactError):
    """A cache file (image features, sentence embeddings) is unreadable or damaged."""


class RunFolderError(ArtefactError):
    """A run folder cannot be used: it is a file, not writable, holds another run, or is in use."""


def describe_kind(kind: str | None) -> str:
    """What an artefact of ``kind`` (its metadata's ``kind``) is, in words, for messages."""
    return KINDS.get(kind or "", f"file of kind {kind!r}" if kind else "file of unknown kind")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via temp file + fsync + rename (the old file stays whole on failure).

    The file gets the mode any new file gets (0666 less the umask: 0644 under 0022), as other tools'
    outputs do; ``tempfile.mkstemp`` would make it 0600 whatever the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> None:
    """Make ``previous`` a copy of ``path`` (a hard link where the file system allows), atomically.

    Called before ``path`` is rewritten, so one damaged file never loses a run: the rewrite makes a
    new file, and ``previous`` keeps the old one.
    """
    path, previous = Path(path), Path(previous)
    tmp = previous.with_name(f".{previous.name}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(path, tmp)
        os.replace(tmp, previous)
    except OSError:
        atomic_write_bytes(previous, path.read_bytes())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks: identifies a weights file by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    """The hex SHA-256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in C order (dtype and shape are checked by safetensors itself)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict,
    kind: str | None = None,
) -> Path:
    """Write tensors + a JSON metadata document (+ per-tensor checksums) as one safetensors file, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = json.dumps(dict(metadata) if kind is None else {"kind": kind, **metadata})
    sums = {k: tensor_sha256(v) for k, v in flat.items()}
    sums[METADATA_CHECKSUM] = text_sha256(meta)  # the header (options, optimiser state, ...) is checked too
    header = {META_KEY: meta, CHECKSUM_KEY: json.dumps(sums)}
    return atomic_write_bytes(path, save(flat, metadata=header))


def load_tensors(
    path: str | os.PathLike,
    what: str = "file",
    error: type[Exception] = ArtefactError,
    kind: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`: (tensors, metadata).

    Any damage is one ``error`` naming ``what`` and the path: missing, a folder, not safetensors,
    metadata that is not a JSON object, a checksum that does not match. With ``kind``, a file that
    records another kind is refused, naming what it is instead.
    """
    path = Path(path)
    problem = file_problem(path, what)
    if problem:
        raise error(problem)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise error(f"{what} {path} is not a readable safetensors file (truncated or another format?): {e}") from None
    raw = header.get(META_KEY)
    if raw is None:
        raise error(f"{what} {path} is a safetensors file but was not written by gram-plugin")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} has corrupt gram-plugin metadata: {e}") from None
    except RecursionError:
        raise error(f"{what} {path} has corrupt gram-plugin metadata: it is nested too deep to read "
                    "(no file gram-plugin writes nests more than a few levels)") from None
    if not isinstance(meta, dict):
        raise error(f"{what} {path}: gram-plugin metadata must be a JSON object, got {type(meta).__name__}")
    if kind is not None and meta.get("kind", kind) != kind:
        raise error(f"{path} is a {describe_kind(meta.get('kind'))}, not {_article(what)} {what}")
    _verify_checksums(path, what, error, header.get(CHECKSUM_KEY), tensors, raw)
    return tensors, meta


def _verify_checksums(path, what, error, raw, tensors, meta_text: str) -> None:
    if raw is None:  # written before checksums existed: nothing to compare with
        return
    try:
        sums = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        sums = None
    if not isinstance(sums, dict):
        raise error(f"{what} {path} has a corrupt checksum table")
    # files written before the metadata had a checksum have no entry for it: their tensors are still checked
    meta_sum = sums.pop(METADATA_CHECKSUM, None)
    if meta_sum is not None and meta_sum != text_sha256(meta_text):
        raise error(f"{what} {path} is damaged: checksum mismatch in its metadata (options, optimiser state, "
                    "step, ...): it was edited or corrupted after it was written")
    bad = sorted(k for k, t in tensors.items() if sums.get(k) != tensor_sha256(t))
    bad += sorted(k for k in sums if k not in tensors)
    if bad:
        raise error(f"{what} {path} is damaged: checksum mismatch in {bad[:5]}{' ...' if len(bad) > 5 else ''}")


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike, what: str = "run folder") -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on folder ``path`` (``.lock`` inside it) while the block runs.

    A second process (or a second trainer in this one) on the same folder gets a ``RunFolderError``
    at once instead of interleaving its files with the first. The OS drops the lock if the process dies.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(f"{what} {path} is not writable: {e.strerror or e}") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        os.close(fd)
        raise RunFolderError(f"{what} {path} is in use by another run (locked); wait for it or use another folder") from None
    try:
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
