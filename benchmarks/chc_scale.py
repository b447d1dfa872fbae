"""CHC at scale: time and peak memory of each stage on growing caption subsets, for a growth fit.

    python3 benchmarks/chc_scale.py --sizes 5000,10000,20000,40961 --out /tmp/chc-scale [--knn auto|nndescent]

Each size runs in a fresh subprocess (clean peak-memory accounting), single-threaded by default
(``--threads 1``: torch, numba, BLAS), on the first n Flickr8k captions (= the first n/5 images),
through ``gram_plugin.chc.build_hierarchy`` with the default CHCConfig. The library's stage
functions are wrapped, not re-implemented, to record per stage: wall time, process CPU time
(user + sys of all threads of this process: HDBSCAN's joblib worker processes, if it starts any, are
not counted) and peak RSS (Linux VmHWM, reset through /proc/self/clear_refs at the
start of the stage). Stages: ``encode`` (embed_captions, cold: no cache unless ``--cache-dir``),
``knn`` (exact_cosine_knn, inside UMAP; absent for NN-descent), ``umap`` (the rest of reduce_umap:
UMAP's own graph and layout), ``hdbscan``, ``rest`` (topic ids, c-TF-IDF words, names, k-means).
Writes one JSON line per size to ``<out>/chc_scale.jsonl`` and prints a table and a power-law fit
``t = a * n^b`` per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-captions.txt.gz"
STAGES = ("encode", "knn", "umap", "hdbscan", "rest")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


class StageClock:
    """Wraps stage functions: wall, CPU and peak RSS per stage, nested stages carved out of the outer one."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self._open: list[list] = []  # [name, t0, c0, peak so far (KiB)]

    def _enter(self, name):
        if self._open:  # close the outer stage's memory window so far (its peak before this one)
            self._open[-1][3] = max(self._open[-1][3], _status_kib("VmHWM"))
        _reset_peak()
        now, cnow = time.perf_counter(), time.process_time()
        # [name, start (shifted past nested stages), cpu start (same), peak KiB, RSS before, true start, true cpu start]
        self._open.append([name, now, cnow, 0, _status_kib("VmRSS"), now, cnow])

    def _exit(self):
        name, t0, c0, peak, rss0, t_true, c_true = self._open.pop()
        now, cnow = time.perf_counter(), time.process_time()
        wall, cpu = now - t0, cnow - c0
        peak = max(peak, _status_kib("VmHWM"))
        rec = self.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0, "rss_before_mib": rss0 / 1024})
        rec["wall_s"] += wall
        rec["cpu_s"] += cpu
        rec["peak_rss_mib"] = max(rec["peak_rss_mib"], peak / 1024)
        if self._open:  # the outer stage does not count the inner one's time, nested stages included
            outer = self._open[-1]
            outer[1] += now - t_true
            outer[2] += cnow - c_true
            _reset_peak()

    def wrap(self, module, attr, name):
        fn = getattr(module, attr)

        def timed(*a, **k):
            self._enter(name)
            try:
                return fn(*a, **k)
            finally:
                self._exit()

        setattr(module, attr, timed)


def run_one(args) -> dict:
    """In this (fresh) process: the pipeline on the first ``args.n`` captions."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from gram_plugin import chc

    captions, ids = chc.read_captions(args.captions)
    n = min(args.n, len(captions))
    captions, ids = captions[:n], (ids[:n] if ids else None)
    # Warm-up, timed apart: numba's JIT compilation of UMAP (and NN-descent) and the encoder's first
    # load are one-off costs (~10 s here) that would otherwise bend the growth fit at small n.
    w0, wc0 = time.perf_counter(), time.process_time()
    chc.embed_captions(captions[:256], progress=False)
    rng = np.random.default_rng(0)
    warm = rng.standard_normal((4200 if args.knn == "nndescent" else 600, 384)).astype(np.float32)
    chc.reduce_umap(warm / np.linalg.norm(warm, axis=1, keepdims=True), chc.CHCConfig(progress=False, knn=args.knn))
    warmup = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - wc0}

    clock = StageClock()
    # each stage wrapped in the module build_hierarchy calls it through (gram_plugin/chc/<stage>.py)
    clock.wrap(chc.embedding, "embed_captions", "encode")
    clock.wrap(chc.reduction, "exact_cosine_knn", "knn")
    clock.wrap(chc.reduction, "reduce_umap", "umap")
    clock.wrap(chc.clustering, "cluster_hdbscan", "hdbscan")
    cfg = chc.CHCConfig(progress=False, knn=args.knn)
    t0, c0 = time.perf_counter(), time.process_time()
    _reset_peak()
    clock._enter("total")
    h = chc.build_hierarchy(captions, image_ids=ids, config=cfg, cache_dir=args.cache_dir)
    clock._exit()
    total = clock.stages.pop("total")
    clock.stages["rest"] = total  # total minus the wrapped stages: ids, votes, c-TF-IDF, names, k-means
    return {
        "n": n, "knn": args.knn, "threads": args.threads, "n_topics": h["n_topics"],
        "noise_share": round(h["noise"]["share"], 4), "stages": clock.stages,
        "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
        "peak_rss_mib_overall": max(s["peak_rss_mib"] for s in clock.stages.values()),
        "top_topics": [(t["name"], t["n_captions"]) for t in sorted(h["topics"], key=lambda t: -t["n_captions"])[:8]],
        "warmup": warmup,
    }


def hdbscan_alone(points_path: str, sizes) -> list[dict]:
    """HDBSCAN (the library's settings, but ``core_dist_n_jobs=1``: one process, so that its CPU time is
    all counted) on the first n points of a saved UMAP output, for the growth of that stage alone."""
    import hdbscan
    import numpy as np

    from gram_plugin.chc import CHCConfig

    cfg, points, rows = CHCConfig(min_cluster_size=100, min_samples=10), np.load(points_path), []  # the 41k values
    for n in sizes:
        t0, c0 = time.perf_counter(), time.process_time()
        labels = hdbscan.HDBSCAN(min_cluster_size=cfg.min_cluster_size, min_samples=cfg.min_samples,
                                 cluster_selection_method=cfg.cluster_selection_method,
                                 core_dist_n_jobs=1).fit_predict(points[:n])
        rows.append({"n": int(min(n, len(points))), "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
                     "topics": int(labels.max() + 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fit_power(ns, ts):
    """Least-squares fit of log t = log a + b log n: returns (a, b)."""
    import numpy as np

    x, y = np.log(np.asarray(ns, float)), np.log(np.maximum(np.asarray(ts, float), 1e-6))
    b, loga = np.polyfit(x, y, 1)
    return float(np.exp(loga)), float(b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,10000,20000,40961")
    p.add_argument("--knn", default="auto", choices=["auto", "exact", "nndescent"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--captions", default=str(CAPTIONS))
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: none, every encode is cold)")
    p.add_argument("--out", default="/tmp/chc-scale")
    p.add_argument("--hdbscan-only", metavar="UMAP_NPY", help="time HDBSCAN alone on prefixes of this saved UMAP output")
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hdbscan_only:
        rows = hdbscan_alone(args.hdbscan_only, [int(s) for s in args.sizes.split(",")])
        a, b = fit_power([r["n"] for r in rows], [r["cpu_s"] for r in rows])
        print(f"fit hdbscan cpu_s = {a:.3g} * n^{b:.2f};  1M: {a * 1e6 ** b:,.0f} cpu-s, 3M: {a * 3e6 ** b:,.0f} cpu-s")
        return 0
    if args.n:
        print(json.dumps(run_one(args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        load0 = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--n", str(n), "--knn", args.knn, "--threads", str(args.threads),
               "--captions", args.captions] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["load_start"], row["load_end"] = load0, os.getloadavg()[0]
        row["utc_end"] = time.strftime("%H:%M:%S", time.gmtime())
        rows.append(row)
        with open(out / "chc_scale.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"n={row['n']}: " + ", ".join(f"{s} {v['cpu_s']:.1f} cpu-s/{v['wall_s']:.1f} s/{v['peak_rss_mib']:.0f} MiB"
                                            for s, v in row["stages"].items())
              + f"; topics {row['n_topics']}, noise {row['noise_share']:.3f}; load {row['load_start']:.2f} -> {row['load_end']:.2f}",
              flush=True)
    print_stage_fits(rows, STAGES, (1e6, 3e6))
    return 0


def print_stage_fits(rows, stages, at, label="fit"):
    """A power-law fit of each stage's CPU seconds over the rows' n, extrapolated to the sizes ``at``."""
    if len(rows) < 2:
        return
    ns = [r["n"] for r in rows]
    for stage in stages:
        ts = [r["stages"].get(stage, {}).get("cpu_s") for r in rows]
        if all(t is not None and t > 0 for t in ts):
            a, b = fit_power(ns, ts)
            print(f"{label} {stage:10s} cpu_s = {a:.3g} * n^{b:.2f};  "
                  + ", ".join(f"{n / 1e6:g}M: {a * n ** b:,.0f} cpu-s" for n in at))


if __name__ == "__main__":
    sys.exit(main())
