"""Small statistics for comparing methods over seeds: mean ± sd, H, and the paired difference.

Base-to-new results are compared seed by seed: two methods run with the same seed see the same
few-shot images, so the per-seed difference removes most of the seed-to-seed spread that an
unpaired mean ± sd comparison keeps. :func:`paired_difference` gives the mean difference, its sd,
the paired t statistic (mean / (sd / sqrt(n))) and how many seeds improved; :func:`t_critical` the
two-sided 5 % threshold for that many seeds. Pure Python: imports nothing beyond the standard library.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 5 % quantiles of Student's t (t_{0.975, df}) for df = 1..30; beyond: the normal 1.96
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def harmonic_mean(base: float, new: float) -> float:
    """H = 2 base new / (base + new), the base-to-new protocol's summary (CoCoOp); 0 when both are 0."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def mean_sd(xs) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``xs``; the sd of a single value is 0.

    Raises:
        ValueError: ``xs`` is empty.
    """
    xs = list(xs)
    if not xs:
        raise ValueError("mean_sd of no values")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def t_critical(n: int) -> float:
    """|t| above which a paired difference over ``n`` seeds is significant at p < 0.05 (two-sided)."""
    if n < 2:
        return float("nan")
    return _T_975[n - 2] if n - 1 <= len(_T_975) else 1.96


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``xs[i] - ref[i]`` summarised: mean ± sd, paired t, how many are > 0."""

    diffs: tuple
    mean: float
    sd: float
    t: float  # nan with one seed, or when every difference is the same
    improved: int

    @property
    def n(self) -> int:
        return len(self.diffs)

    def format(self, digits: int = 1) -> str:
        """``+1.2 ± 0.5 (t +4.1; 3/3 > 0)``."""
        t = "n/a" if math.isnan(self.t) else f"{self.t:+.{digits}f}"
        return f"{self.mean:+.{digits}f} ± {self.sd:.{digits}f} (t {t}; {self.improved}/{self.n} > 0)"


def paired_difference(xs, ref) -> PairedDifference:
    """The paired difference of ``xs`` against ``ref`` (the same seeds, in the same order).

    Raises:
        ValueError: the two have different lengths, or are empty.
    """
    xs, ref = list(xs), list(ref)
    if len(xs) != len(ref) or not xs:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(xs)} and {len(ref)} values")
    d = tuple(a - b for a, b in zip(xs, ref))
    m, s = mean_sd(d)
    t = m / (s / math.sqrt(len(d))) if s > 0 else float("nan")
    return PairedDifference(d, m, s, t, sum(x > 0 for x in d))


__all__ = ["harmonic_mean", "mean_sd", "t_critical", "paired_difference", "PairedDifference"]
