"""The run folder of a command (``--out``): :func:`folder_problems` before anything is written, then a locked :class:`Run`.

Every command writes into one run folder: ``config.yaml`` (the options), ``log.txt``, ``metrics.json``,
its artefacts (``init.safetensors``, ``prompt.safetensors``, ``accuracy.png``) and, for meta-train, the
checkpoints in ``meta/`` that ``--resume`` continues from. A run also writes the marker
``.gram-plugin-run``: ``--overwrite`` replaces only a folder that holds one (never the user's own
``config.yaml`` or ``meta/``), and builds the new run beside the old one (``.NAME.new-XXXX``), swapping
the two only when the command succeeded: a failed or interrupted ``--overwrite`` leaves the old run whole.
A folder holding only what a run that failed before writing any artefact leaves (marker, ``config.yaml``,
``log.txt``, ``feature_cache``) is reused without ``--overwrite`` (its log is appended to).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from ..paths import inside_run_dir
from .options import CLIError

RUN_MARKER = ".gram-plugin-run"  # written by every run: what --overwrite may replace
CARRIED_OVER = ("feature_cache",)  # caches an --overwrite keeps (hard links into the new run)
# what a run that failed before writing any artefact leaves: such a folder is reused without --overwrite
_NO_ARTEFACT = {RUN_MARKER, "config.yaml", "log.txt", *CARRIED_OVER}
_NOT_COMPARED_ON_RESUME = {"quiet", "threads", "resume", "overwrite", "meta_steps", "out", "debug", "no_image_cache"}


class Run:
    """The run folder of one command, locked while the command writes to it.

    Opened only after every input was checked. ``resume``: continue the run already there (its
    ``config.yaml`` must agree); ``overwrite``: replace the run there (only a folder holding a
    gram-plugin run): the new one is written beside it and swapped in when the command succeeds
    (caches are carried over). ``resumable``: the command has ``--resume`` (the messages offer it).
    """

    def __init__(self, out: str, config: dict, resume: bool = False, overwrite: bool = False,
                 resumable: bool = False):
        from ..safeio import locked_dir  # safeio imports torch: not at module level (plan() runs before torch)

        self.final = self.dir = Path(out)
        self.config = config
        self.resumable = resumable
        self._staging: Path | None = None
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locked_dir(self.final))
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._discard_staging()
            self._lock.close()
            raise
        self._log = open(self.path("log.txt"), "a", encoding="utf-8")

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        import yaml

        from ..safeio import atomic_write_text

        if overwrite and run_contents(self.final):  # checked again under the lock
            if not holds_run(self.final):
                raise CLIError(not_a_run(self.final))
            self._staging = self.dir = self.final.parent / f".{self.final.name}.new-{secrets.token_hex(4)}"
            self.dir.mkdir()
            for name in CARRIED_OVER:
                _link_tree(self.final / name, self.dir / name)
        elif not overwrite and not resume and holds_artefacts(self.final):
            raise CLIError(not_empty(self.final, self.resumable))
        saved = self.dir / "config.yaml"
        if resume and saved.exists():
            before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            # options both know (a run written by an older gram-plugin lacks the newer ones)
            differ = sorted(k for k in set(before) & set(self.config)
                            if k not in _NOT_COMPARED_ON_RESUME and before[k] != self.config[k])
            if differ:
                raise CLIError(f"--resume: options differ from the run's config.yaml in {self.dir}: "
                               + ", ".join(f"{k} {before.get(k)!r} -> {self.config.get(k)!r}" for k in differ))
        if not (self.dir / RUN_MARKER).exists():
            atomic_write_text(self.dir / RUN_MARKER, json.dumps(
                {"command": self.config.get("command"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        atomic_write_text(saved, yaml.safe_dump(self.config, sort_keys=True))

    def _swap_in(self) -> None:
        """The new run (written beside the old one) replaces it: two renames, then the old one goes."""
        old = self.final.parent / f".{self.final.name}.old-{secrets.token_hex(4)}"
        os.rename(self.final, old)
        os.rename(self._staging, self.final)
        self._staging, self.dir = None, self.final
        shutil.rmtree(old, ignore_errors=True)

    def _discard_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging, self.dir = None, self.final

    def path(self, relative: str) -> Path:
        """A path inside the run folder (refused if ``relative`` would leave it)."""
        return inside_run_dir(self.dir, relative)

    def log(self, msg: str) -> None:
        """Print ``msg`` with the time and append it to ``log.txt``."""
        if self._staging is not None:  # paths as they will be once the new run is swapped in
            msg = msg.replace(str(self._staging), str(self.final))
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def write_metrics(self, metrics: dict) -> Path:
        """Write ``metrics.json`` atomically; a NaN in it is refused (``ValueError``: a bug)."""
        from ..safeio import atomic_write_text

        # allow_nan=False: a NaN reaching a result is a bug, never a number in metrics.json
        return atomic_write_text(self.path("metrics.json"), json.dumps(metrics, indent=2, allow_nan=False))

    def plot(self, curves: dict[str, list[float]], name: str = "accuracy.png", title: str = "",
             lines: dict[str, float] | None = None) -> Path:
        """Accuracy curves per epoch into ``name``, and ``lines`` (e.g. zero-shot's, untrained) as horizontal
        lines (needs matplotlib: the 'clip' extra)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], marker="o", ms=3, label=label)
        for (label, y), style in zip((lines or {}).items(), ("-", "--", ":", "-.")):
            ax.axhline(100 * y, color="0.4", linestyle=style, linewidth=1.2, label=label)
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

    def close(self, succeeded: bool = True):
        """Close the log and release the lock; an ``--overwrite`` run is swapped in if it ``succeeded``,
        else discarded (the previous run stays as it was)."""
        self._log.close()
        try:
            if succeeded and self._staging is not None:
                self._swap_in()
        finally:
            self._discard_staging()
            self._lock.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if isinstance(error, KeyboardInterrupt):
            self.log(f"interrupted (Ctrl-C){': ' + str(error) if str(error) else ''}")
        elif error is not None:
            self.log(f"FAILED: {error or type(error).__name__}")
        replacing = self._staging is not None
        if error is not None and replacing:
            self.log(f"--overwrite: the previous run in {self.final} is kept as it was")
        self.close(succeeded=error is None)
        if isinstance(error, KeyboardInterrupt) and replacing:
            # what the interrupted command saved (a checkpoint, a partial prompt) went with its unfinished run:
            # say so, instead of pointing at files that are gone or offering --resume of the previous run
            raise KeyboardInterrupt(f"nothing of the unfinished run was kept (--overwrite keeps the previous run in "
                                    f"{self.final} as it was)") from None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run gram-plugin wrote (its marker), i.e. what ``--overwrite`` may replace."""
    return (folder / RUN_MARKER).is_file()


def not_a_run(folder: Path) -> str:
    """The message refusing ``--overwrite`` on a folder that holds no gram-plugin run."""
    held = run_contents(folder)
    return (f"--overwrite: {folder} holds no gram-plugin run (no {RUN_MARKER} marker; it holds "
            f"{', '.join(held[:6])}{' ...' if len(held) > 6 else ''}); nothing was deleted: choose another --out, "
            "or empty the folder yourself")


def _link_tree(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` into ``dst`` as hard links (a copy where the file system has none)."""
    if not src.is_dir():
        return
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def run_contents(folder: Path) -> list[str]:
    """The names in a run folder, its lock file left out (empty for a folder that does not exist)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []


def holds_artefacts(folder: Path) -> bool:
    """Whether ``folder`` holds anything a new run could destroy: anything but an empty folder, or the
    config, log and caches of a gram-plugin run that failed before writing an artefact (reused as is)."""
    held = run_contents(folder)
    return bool(held) and not (holds_run(folder) and set(held) <= _NO_ARTEFACT)


def not_empty(folder: Path, resumable: bool = False) -> str:
    """The message refusing a run folder that already holds a run (``--resume`` offered where the command has it)."""
    held = run_contents(folder)
    resume = "--resume to continue the run there, " if resumable else ""
    return (f"run folder {folder} is not empty (holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}); "
            f"pass {resume}--overwrite to replace it, or choose another --out")


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
    elif overwrite and run_contents(out) and not holds_run(out):
        problems.append(not_a_run(out))
    elif not resume and not overwrite and holds_artefacts(out):
        problems.append(not_empty(out, resumable=hasattr(args, "resume")))
    cache = getattr(args, "cache_dir", None)
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        problems.append(f"--cache-dir {cache} is a file, not a folder")
    return problems
