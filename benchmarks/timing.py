"""Side-by-side timing shared by the benchmark scripts (these machines are noisy: compare variants
run round-robin in one process, and report medians of wall and of process CPU time)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, digits: int = 2) -> tuple[dict, dict]:
    """Run every variant once per round, ``repeats`` rounds (A, B, C, A, B, C, ...), printing each round.

    Returns ``(wall, cpu)``: ``{variant: [seconds per round]}`` of wall-clock and process CPU time.
    """
    wall = {v: [] for v in fns}
    cpu = {v: [] for v in fns}
    for r in range(repeats):
        for v, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        print(f"round {r + 1}: " + ", ".join(f"{v} {wall[v][-1]:.{digits}f}s/{cpu[v][-1]:.{digits}f}cpu" for v in fns),
              flush=True)
    return wall, cpu


def medians(per_round: Mapping[str, list[float]]) -> dict[str, float]:
    return {v: statistics.median(ts) for v, ts in per_round.items()}
