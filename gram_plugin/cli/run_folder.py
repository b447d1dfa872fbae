"""The run folder of a command (``--out``): :func:`folder_problems` before anything is written, then a locked :class:`Run`.

Every command writes into one run folder: ``config.yaml`` (the options), ``log.txt``, ``metrics.json``,
its artefacts (``init.safetensors``, ``prompt.safetensors``, ``accuracy.png``) and, for meta-train, the
checkpoints in ``meta/`` that ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from ..paths import inside_run_dir
from ..safeio import atomic_write_text, locked_dir
from .options import CLIError

RUN_FILES = ("config.yaml", "log.txt", "metrics.json", "init.safetensors", "prompt.safetensors", "accuracy.png", "meta")
_NOT_COMPARED_ON_RESUME = {"quiet", "threads", "resume", "overwrite", "meta_steps", "out", "debug", "no_image_cache"}


class Run:
    """The run folder of one command, locked while the command writes to it.

    Opened only after every input was checked. ``resume``: continue the run already there (its
    ``config.yaml`` must agree); ``overwrite``: remove the previous run's files first (caches stay).
    """

    def __init__(self, out: str, config: dict, resume: bool = False, overwrite: bool = False):
        self.dir = Path(out)
        self.config = config
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locked_dir(self.dir))
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._lock.close()
            raise
        self._log = open(self.path("log.txt"), "a", encoding="utf-8")

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        import yaml

        if overwrite:
            for name in RUN_FILES:
                p = self.dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif not resume and run_contents(self.dir):  # checked again under the lock
            raise CLIError(not_empty(self.dir))
        saved = self.dir / "config.yaml"
        if resume and saved.exists():
            before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            # options both know (a run written by an older gram-plugin lacks the newer ones)
            differ = sorted(k for k in set(before) & set(self.config)
                            if k not in _NOT_COMPARED_ON_RESUME and before[k] != self.config[k])
            if differ:
                raise CLIError(f"--resume: options differ from the run's config.yaml in {self.dir}: "
                               + ", ".join(f"{k} {before.get(k)!r} -> {self.config.get(k)!r}" for k in differ))
        atomic_write_text(saved, yaml.safe_dump(self.config, sort_keys=True))

    def path(self, relative: str) -> Path:
        """A path inside the run folder (refused if ``relative`` would leave it)."""
        return inside_run_dir(self.dir, relative)

    def log(self, msg: str) -> None:
        """Print ``msg`` with the time and append it to ``log.txt``."""
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def write_metrics(self, metrics: dict) -> Path:
        """Write ``metrics.json`` atomically; a NaN in it is refused (``ValueError``: a bug)."""
        # allow_nan=False: a NaN reaching a result is a bug, never a number in metrics.json
        return atomic_write_text(self.path("metrics.json"), json.dumps(metrics, indent=2, allow_nan=False))

    def plot(self, curves: dict[str, list[float]], name: str = "accuracy.png", title: str = "") -> Path:
        """Accuracy curves per epoch into ``name`` (needs matplotlib: the 'clip' extra)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = self.path(name)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p

    def close(self):
        """Close ``log.txt`` and release the folder's lock."""
        self._log.close()
        self._lock.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self.log(f"FAILED: {error}")
        self.close()


def run_contents(folder: Path) -> list[str]:
    """The names in a run folder, its lock file left out (empty for a folder that does not exist)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []


def not_empty(folder: Path) -> str:
    """The message refusing a run folder that already holds a run."""
    held = run_contents(folder)
    return (f"run folder {folder} is not empty (holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}); "
            "pass --resume to continue the run there, --overwrite to replace it, or choose another --out")


def writable(folder: Path) -> bool:
    """A real probe (permissions, read-only file systems, root included); the probe file deletes itself."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problems(args) -> list[str]:
    """What stops ``--out`` (with ``--resume`` / ``--overwrite``) and ``--cache-dir`` from being used, as flag messages."""
    problems = []
    out = Path(args.out)
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    if resume and overwrite:
        problems.append("--resume and --overwrite exclude each other")
    base = nearest_existing(out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file, not a folder")
    elif not base.is_dir():
        problems.append(f"--out {out} cannot be created: {base} is a file")
    elif not writable(base):
        problems.append(f"--out {out} is not writable (cannot create files in {base})")
    elif resume and not (out / "config.yaml").is_file():
        problems.append(f"--resume: {out} holds no run to continue (no config.yaml)")
    elif not resume and not overwrite and run_contents(out):
        problems.append(not_empty(out))
    cache = getattr(args, "cache_dir", None)
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        problems.append(f"--cache-dir {cache} is a file, not a folder")
    return problems
