"""Where a run may write: every output path named in a config stays inside the run folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GramPluginError


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
