"""Paths, checked without importing torch: what a path the user gives must be (:func:`file_problem`,
:func:`data_spec_problem`), and where a run may write (every output path named in a config stays inside
the run folder: :func:`inside_run_dir`)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GramPluginError


# the file names an image folder's images end with (any case)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# --data kinds whose spec is KIND:ROOT (anything else names an image folder)
DATA_KINDS = ("caltech101", "imagenet", "folder")
# what each kind's loader (gram_plugin.data) says when its folder is not there; the CLI says it before torch
MISSING_DATA_ROOT = {"caltech101": "no 101_ObjectCategories folder under {root}",
                     "imagenet": "no classnames.txt under {root}",
                     "folder": "image folder {root} does not exist"}


def file_problem(path: str | os.PathLike, what: str) -> str | None:
    """What keeps ``path`` from being read as ``what`` (a folder, nothing there); ``None`` when it is a file."""
    path = Path(path)
    if path.is_dir():
        return f"{what} {path} is a folder, not a file"
    if not path.is_file():
        return f"{what} {path} does not exist"
    return None


def data_spec_problem(spec: str) -> str | None:
    """What is wrong with a ``--data`` spec (``default``, ``KIND:ROOT`` or a folder) that shows before its
    images are listed: a ``KIND:`` without a folder, or a folder that does not exist; ``None`` otherwise.
    Deeper layout problems are the loaders' (``gram_plugin.data``)."""
    if spec == "default":
        return None
    kind, colon, root = spec.partition(":")
    if colon and kind in DATA_KINDS and not root.strip():
        # "folder:$DATA" with DATA unset would otherwise read the current folder
        return f"data spec {spec!r} names no folder after the ':' (is it built from an unset variable such as $DATA?)"
    if kind not in DATA_KINDS:
        kind, root = "folder", spec
    if Path(root).is_dir():
        return None
    return MISSING_DATA_ROOT[kind].format(root=Path(root))


class UnsafePathError(GramPluginError, ValueError):
    """A path from a config would write outside the run folder."""


def inside_run_dir(run_dir: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``run_dir / relative``, refusing absolute paths, ``..`` escapes and symlinks that lead out."""
    root = Path(run_dir).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise UnsafePathError(f"output path {str(relative)!r} must be relative to the run folder {root}")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise UnsafePathError(f"output path {str(relative)!r} leaves the run folder {root}")
    return target
