"""Read Dassl base-to-new output folders and compare two methods seed by seed (``gram-plugin compare``).

CoOp's scripts (and examples/scripts/base2new_*.sh) write one folder per run::

    output/base2new/train_base/<dataset>/shots_<N>/<trainer>/<cfg>/seed<K>/log.txt   train on base, test on base
    output/base2new/test_new/<dataset>/shots_<N>/<trainer>/<cfg>/seed<K>/log.txt     --eval-only on new

Each ``log.txt`` is Dassl's log of that run: the arguments, the whole config (``DATASET.NAME``,
``DATASET.SUBSAMPLE_CLASSES``, ``DATASET.NUM_SHOTS``, ``TRAINER.NAME``, ``SEED``) and, after
``Evaluate on the *test* set``, the result block (``* accuracy: 93.1%``). :func:`read_log` reads
those; nothing is inferred from folder names except the sibling tree: a folder under ``train_base``
is read together with the same path under ``test_new`` (and ``test_base``), so one folder names one
method. :func:`compare` pairs two methods by seed and reports base / new / H per seed, mean ± sd and
the paired difference B - A (:mod:`gram_plugin.stats`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gram_plugin.errors import GramPluginError
from gram_plugin.stats import PairedDifference, harmonic_mean, mean_sd, paired_difference, t_critical

# the folders CoOp-style scripts put base-to-new runs in; one method's runs sit at the same path under each
SPLIT_FOLDERS = ("train_base", "test_base", "test_new")
_ACCURACY = re.compile(r"^\* accuracy: ([-+0-9.eE]+)%")
_EVALUATE = re.compile(r"^Evaluate on the \*(\w+)\* set")
_CONFIG_KEY = re.compile(r"^(\w+):(?: (.*))?$")


class DasslResultsError(GramPluginError, ValueError):
    """A results folder or log cannot be compared (no logs, no test result, mixed methods, no common seed)."""


@dataclass(frozen=True)
class RunLog:
    """One Dassl run's ``log.txt``: what ran and its final test accuracy (percent)."""

    path: Path
    dataset: str
    trainer: str
    config: str  # the --config-file's stem, e.g. vit_b16_ctxv1_gram
    shots: int
    classes: str  # DATASET.SUBSAMPLE_CLASSES: base, new or all
    seed: int
    eval_only: bool
    accuracy: float | None  # None: the log holds no test result (TEST.NO_TEST, or the run stopped)
    clip_weights: str = ""  # GRAM.CLIP_WEIGHTS as run ("random": a smoke run)

    @property
    def method(self) -> tuple:
        return (self.dataset, self.trainer, self.config, self.shots)


def read_log(path: str | Path) -> RunLog:
    """Parse a Dassl ``log.txt``: its printed arguments and config, and the last accuracy on the *test*
    split (a validation result during training is not taken).

    Raises:
        DasslResultsError: the file is not a Dassl log (no printed config).
    """
    path = Path(path)
    args, cfg, section = {}, {}, None
    accuracy, split, part = None, None, None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stripped = line.strip()
        if stripped in ("** Arguments **", "** Config **"):
            part = stripped
            continue
        if stripped.startswith("Collecting env info"):
            part = None
        m = _EVALUATE.match(stripped)
        if m:
            split = m.group(1)
            continue
        m = _ACCURACY.match(stripped)
        if m and split == "test":
            accuracy = float(m.group(1))
            continue
        if part == "** Arguments **":
            key, _, value = stripped.partition(": ")
            if key:
                args[key] = value
        elif part == "** Config **":
            m = _CONFIG_KEY.match(line.rstrip()) if not line.startswith(" ") else None
            if m:
                section = m.group(1)
            elif line.startswith("  ") and not line.startswith("   ") and section:
                key, _, value = stripped.partition(": ")
                cfg[f"{section}.{key.rstrip(':')}"] = value
    missing = [k for k in ("DATASET.NAME", "DATASET.SUBSAMPLE_CLASSES", "TRAINER.NAME") if k not in cfg]
    if missing:
        raise DasslResultsError(f"{path}: not a Dassl log of a CoOp-style run (its printed config lacks {', '.join(missing)})")
    try:
        seed = int(cfg.get("SEED", args.get("seed", "")))
        shots = int(cfg.get("DATASET.NUM_SHOTS", "-1"))
    except ValueError as e:
        raise DasslResultsError(f"{path}: unreadable SEED or DATASET.NUM_SHOTS ({e})") from None
    return RunLog(path=path, dataset=cfg["DATASET.NAME"], trainer=cfg["TRAINER.NAME"],
                  config=Path(args.get("config_file", "") or "?").stem, shots=shots,
                  classes=cfg["DATASET.SUBSAMPLE_CLASSES"], seed=seed, eval_only=args.get("eval_only") == "True",
                  accuracy=accuracy, clip_weights=cfg.get("GRAM.CLIP_WEIGHTS", "").strip("'\""))


def method_folders(folder: Path) -> list[Path]:
    """``folder`` and, when one of its path parts is ``train_base`` / ``test_base`` / ``test_new``,
    the same path under the other two (where they exist)."""
    folder = Path(folder)
    out = [folder]
    parts = folder.parts
    for i, part in enumerate(parts):
        if part in SPLIT_FOLDERS:
            for other in SPLIT_FOLDERS:
                sibling = Path(*parts[:i], other, *parts[i + 1:])
                if other != part and sibling.is_dir():
                    out.append(sibling)
    return out


@dataclass
class MethodResults:
    """One method's base / new accuracies by seed (percent), read from its folders."""

    folder: Path
    method: tuple  # (dataset, trainer, config, shots)
    base: dict = field(default_factory=dict)  # seed -> accuracy
    new: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def name(self) -> str:
        dataset, trainer, config, shots = self.method
        return f"{trainer}/{config} on {dataset}, {shots} shots"

    def seeds(self) -> list[int]:
        """Seeds with both a base and a new result."""
        return sorted(set(self.base) & set(self.new))

    def h(self, seed: int) -> float:
        return harmonic_mean(self.base[seed], self.new[seed])


def read_method(folder: str | Path) -> MethodResults:
    """Every ``log.txt`` under ``folder`` (and its base/new sibling, :func:`method_folders`) as one method.

    A base result is the test accuracy of a run on the base classes (an ``--eval-only`` run on them is
    preferred to the test at the end of training); a new result that of a run on the new classes.

    Raises:
        DasslResultsError: no folder, no log with a test result, or logs of more than one method.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DasslResultsError(f"{folder}: no such folder (give a Dassl output folder, e.g. "
                                "output/base2new/train_base/caltech101/shots_16/CoOp/vit_b16_ctxv1)")
    logs = [read_log(p) for f in method_folders(folder) for p in sorted(f.rglob("log.txt"))]
    with_result = [r for r in logs if r.accuracy is not None]
    if not with_result:
        raise DasslResultsError(f"{folder}: no Dassl log.txt with a test result under it or its "
                                f"{'/'.join(SPLIT_FOLDERS)} siblings ({len(logs)} log(s) without one)")
    methods = sorted({r.method for r in with_result})
    if len(methods) > 1:
        listed = "; ".join(f"{t}/{c} on {d}, {s} shots" for d, t, c, s in methods)
        raise DasslResultsError(f"{folder} holds runs of {len(methods)} methods ({listed}): name the folder of one "
                                "(e.g. .../train_base/<dataset>/shots_N/<trainer>/<cfg>)")
    out = MethodResults(folder=folder, method=methods[0], logs=with_result)
    for r in sorted(with_result, key=lambda r: r.eval_only):  # eval-only runs last: they win
        if r.classes in ("base", "new"):
            getattr(out, r.classes)[r.seed] = r.accuracy
    return out


@dataclass
class Comparison:
    """Two methods paired by seed: B - A on base, new and H."""

    a: MethodResults
    b: MethodResults
    seeds: list
    diffs: dict  # "base" / "new" / "H" -> PairedDifference

    def rows(self) -> list[tuple]:
        """(seed, A base, A new, A H, B base, B new, B H) per common seed."""
        return [(s, self.a.base[s], self.a.new[s], self.a.h(s), self.b.base[s], self.b.new[s], self.b.h(s))
                for s in self.seeds]

    def format(self) -> str:
        """The report ``gram-plugin compare`` prints."""
        lines = [f"A: {self.a.name}  ({self.a.folder})", f"B: {self.b.name}  ({self.b.folder})", ""]
        head = ("seed", "A base", "A new", "A H", "B base", "B new", "B H")
        lines.append(" | ".join(f"{h:>7}" for h in head))
        rows = self.rows()
        for row in rows:
            lines.append(" | ".join([f"{row[0]:>7}"] + [f"{v:7.2f}" for v in row[1:]]))
        cols = list(zip(*rows))[1:]
        lines.append(" | ".join([f"{'mean':>7}"] + [f"{mean_sd(c)[0]:7.2f}" for c in cols]))
        lines.append(" | ".join([f"{'sd':>7}"] + [f"{mean_sd(c)[1]:7.2f}" for c in cols]))
        n = len(self.seeds)
        lines += ["", f"B - A, paired over {n} seed{'s' * (n != 1)} ({', '.join(map(str, self.seeds))}), points:"]
        for key in ("base", "new", "H"):
            d = self.diffs[key]
            lines.append(f"  {key:>4}: {d.format(2)}  -- {d.improved} of {d.n} seeds improved")
        crit = t_critical(n)
        lines.append(f"  (p < 0.05, two-sided, needs |t| > {crit:.2f} with {n} seeds)" if n > 1 else
                     "  (one seed: no spread, no t statistic; run more seeds)")
        random = [label for label, m in (("A", self.a), ("B", self.b)) if any(r.clip_weights == "random" for r in m.logs)]
        if random:
            lines.append(f"  {' and '.join(random)} ran on a random CLIP (GRAM.CLIP_WEIGHTS random): these accuracies mean nothing")
        for label, m in (("A", self.a), ("B", self.b)):
            unpaired = sorted((set(m.base) | set(m.new)) - set(self.seeds))
            if unpaired:
                lines.append(f"  not paired: {label}'s seed(s) {', '.join(map(str, unpaired))} (no base and new "
                             "result in both)")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Per-seed base, new and H of A and B (one line per seed from A to B) as a PNG.

        Raises:
            ModuleNotFoundError: matplotlib is not installed.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), sharey=False)
        for ax, (key, ia, ib) in zip(axes, (("base", 1, 4), ("new", 2, 5), ("H", 3, 6))):
            for row in rows:
                ax.plot([0, 1], [row[ia], row[ib]], "o-", color="tab:blue" if row[ib] >= row[ia] else "tab:red", alpha=0.7)
                ax.annotate(f"seed {row[0]}", (1, row[ib]), xytext=(4, 0), textcoords="offset points", fontsize=7)
            ax.set_xticks([0, 1], ["A", "B"])
            ax.set_xlim(-0.3, 1.5)
            ax.set_title(f"{key}: B - A {self.diffs[key].mean:+.2f}")
        axes[0].set_ylabel("accuracy (%)")
        fig.suptitle(f"A: {self.a.name}\nB: {self.b.name}", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def compare(folder_a: str | Path, folder_b: str | Path) -> Comparison:
    """Read two methods' base-to-new folders (:func:`read_method`) and pair them by seed.

    Raises:
        DasslResultsError: a folder cannot be read, the two are on different datasets, or they share
            no seed with both a base and a new result.
    """
    a, b = read_method(folder_a), read_method(folder_b)
    if a.method[0] != b.method[0]:
        raise DasslResultsError(f"{folder_a} is on {a.method[0]} and {folder_b} on {b.method[0]}: compare runs on one dataset")
    seeds = sorted(set(a.seeds()) & set(b.seeds()))
    if not seeds:
        def has(m):
            return f"base seeds {sorted(m.base) or 'none'}, new seeds {sorted(m.new) or 'none'}"

        raise DasslResultsError(f"no seed has a base and a new result in both folders (A: {has(a)}; B: {has(b)}); "
                                "run the base2new test script for the new classes")
    diffs = {
        "base": paired_difference([b.base[s] for s in seeds], [a.base[s] for s in seeds]),
        "new": paired_difference([b.new[s] for s in seeds], [a.new[s] for s in seeds]),
        "H": paired_difference([b.h(s) for s in seeds], [a.h(s) for s in seeds]),
    }
    return Comparison(a, b, seeds, diffs)


__all__ = ["RunLog", "read_log", "read_method", "method_folders", "MethodResults", "Comparison", "compare",
           "DasslResultsError", "PairedDifference"]
