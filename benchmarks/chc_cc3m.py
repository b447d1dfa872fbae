"""CHC at CC3M scale (issue 26): the sampled path's topic agreement on real captions, and its cost growth.

    # 1. agreement: the real Flickr8k captions (40,961) through the exact path (seeds 0 and 1: the yardstick)
    #    and the sampled path (fit on --samples captions, the rest assigned, both assignment modes);
    #    adjusted Rand index of each against the exact seed-0 topics
    python3 benchmarks/chc_cc3m.py ari --samples 5000,10000,20000 --cache-dir /tmp/perf-chc-cache --out /tmp/perf/chc-ari.json

    # 1b. what the sampled path's settings change (min_samples / min_cluster_size rules on the sample, UMAP's
    #     n_neighbors there, the assignment, the sample's size and seed): the exact seeds 0 and 1 once,
    #     then every variant on every (sample, seed); exact neighbour search; table of means over the seeds
    python3 benchmarks/chc_cc3m.py grid --samples 5000,10000,20000 --seeds 0,1,2 --cache-dir /tmp/perf-chc-cache --out /tmp/perf/chc-grid.json

    # 2. growth: build_hierarchy with the default CHCConfig (fit_sample 100,000, or --fit-sample) on N
    #    captions, each N in a fresh process. Beyond the 40,961 real captions the corpus is REPLICATED: caption i is real caption
    #    i mod 40,961 and its embedding that caption's MiniLM embedding plus Gaussian noise (--noise per
    #    dimension, then L2-normalised; cosine to the original ~0.98 at 0.01): a cost measurement only,
    #    the topics of replicas mean nothing. The encoder is not run (its cost is linear: projected from
    #    its measured rate, CHC.md).
    python3 benchmarks/chc_cc3m.py growth --sizes 40961,250000,500000,1000000 --cache-dir /tmp/perf-chc-cache --out /tmp/perf/chc-growth.jsonl

Single-threaded (torch, BLAS, numba: ``--threads 1``) so the process CPU time is the work done, but for
HDBSCAN's core distances (joblib worker processes: its wall time is the measure). Per stage
(wrapping the library's functions, as benchmarks/chc_scale.py does): CPU and wall seconds, peak RSS
(VmHWM reset at each stage). Stages: ``knn`` (exact k-NN graph of what UMAP is fit on), ``umap`` (the
rest of the UMAP fit), ``hdbscan`` (the fit), ``index`` (NN-descent index of the sample, on a CPU),
``neighbours`` (each assigned caption's neighbours in the sample), ``predict`` (the topic of each assigned
caption: the neighbours' vote, ``assign="knn"``, or hdbscan.approximate_predict, ``assign="umap"``), ``rest``
(everything else of build_hierarchy: UMAP transform weights, topic ids, image votes, c-TF-IDF, names).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chc_scale import StageClock, _reset_peak, _status_kib, print_stage_fits  # noqa: E402

CAPTIONS = Path(os.environ.get("GRAM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "flickr8k-captions.txt.gz"

STAGES = ("knn", "umap", "hdbscan", "index", "neighbours", "predict", "rest")


def real_corpus(args):
    """The real captions, their image ids and MiniLM embeddings (encoded once into --cache-dir)."""
    import numpy as np

    from gram_plugin import chc

    captions, ids = chc.read_captions(args.captions)
    emb = chc.embed_captions(captions, cache_dir=args.cache_dir, progress=False, device="cpu")
    return captions, ids, np.asarray(emb, dtype=np.float32)


def topic_labels(h) -> "np.ndarray":
    import numpy as np

    out = np.full(h["n_captions"], -1, dtype=np.int64)
    for t in h["topics"]:
        out[t["captions"]] = t["id"]
    return out


def agreement(a, b) -> dict:
    """ARI over all captions (noise as one more label) and over the captions in a topic in both."""
    from sklearn.metrics import adjusted_rand_score

    both = (a >= 0) & (b >= 0)
    return {"ari_all": float(adjusted_rand_score(a, b)), "ari_in_topic_both": float(adjusted_rand_score(a[both], b[both])),
            "in_topic_both": float(both.mean())}


def run_ari(args):
    import numpy as np

    from gram_plugin import chc

    captions, ids, emb = real_corpus(args)
    rows = []

    def build(**cfg):
        c0, t0 = time.process_time(), time.perf_counter()
        h = chc.build_hierarchy(captions, image_ids=ids, embeddings=emb, config=chc.CHCConfig(progress=False, device="cpu", **cfg))
        return h, {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "timings_s": h["timings_s"],
                   "n_topics": h["n_topics"], "noise_share": round(h["noise"]["share"], 4), "fit": h["fit"]}

    ref, info = build(fit_sample=0)
    ref_labels = topic_labels(ref)
    rows.append({"run": "exact seed 0 (reference)", **info})
    print(json.dumps(rows[-1]), flush=True)
    other, info = build(fit_sample=0, seed=1)
    rows.append({"run": "exact seed 1 (yardstick)", **info, **agreement(ref_labels, topic_labels(other))})
    print(json.dumps(rows[-1]), flush=True)
    for size in [int(s) for s in args.samples.split(",")]:
        for assign in ("umap", "knn"):
            for search in ("exact", "nndescent"):
                h, info = build(fit_sample=size, assign=assign, assign_knn=search)
                rows.append({"run": f"sampled {size} ({assign}, {search})", **info, **agreement(ref_labels, topic_labels(h))})
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"n": len(captions), "rows": rows}, indent=1))
    print(f"\n{'run':38s} {'ARI all':>8s} {'ARI in both':>11s} {'topics':>6s} {'noise':>6s} {'cpu s':>7s}")
    for r in rows:
        print(f"{r['run']:38s} {r.get('ari_all', 1.0):8.3f} {r.get('ari_in_topic_both', 1.0):11.3f} {r['n_topics']:6d} "
              f"{r['noise_share']:6.3f} {r['cpu_s']:7.1f}")
    return 0


# name -> (min_cluster_size rule, min_samples rule, UMAP n_neighbors on the sample, assignment); a rule maps the
# corpus's value v and the sampled fraction f to the sample's: "linear" round(v f) (the library's rule),
# "sqrt" round(v sqrt f), "kept" v; at least 2, min_samples at most min_cluster_size. "refit": HDBSCAN
# with the corpus's own sizes on every caption's coordinates (the sample's UMAP, the rest transformed).
GRID = {
    "umap (the old default)": ("linear", "linear", 15, "umap"),
    "knn (the new default)": ("linear", "linear", 15, "knn"),
    "knn, min_samples kept": ("linear", "kept", 15, "knn"),
    "knn, min_samples kept, n_neighbors 30": ("linear", "kept", 30, "knn"),
    "knn, sqrt min_cluster_size, min_samples kept": ("sqrt", "kept", 15, "knn"),
    "knn, sqrt both": ("sqrt", "sqrt", 15, "knn"),
    "refit: HDBSCAN on all transformed coordinates": ("linear", "linear", 15, "refit"),
}


def sample_size_rule(value: int, fraction: float, rule: str) -> int:
    factor = {"linear": fraction, "sqrt": fraction ** 0.5, "kept": 1.0}[rule]
    return max(2, int(round(value * factor)))


def run_grid(args):
    """Every GRID variant on every (sample size, seed), against the exact seed-0 topics. The variants are
    built from the library's own pieces (sampling.py); the library's sampled path is checked to give the
    same labels as the "umap" / "knn" variants at the first sample size and seed."""
    import hdbscan
    import numpy as np

    from gram_plugin import chc
    from gram_plugin.chc import reduction, sampling

    captions, ids, emb = real_corpus(args)
    n, cpu = len(emb), time.process_time
    base = chc.CHCConfig(progress=False, device="cpu").resolved(n)  # the corpus's sizes: 100 / 10 at 40,961
    warm = emb[:3000]  # numba's compilation outside the timings
    sampling.reduce_and_cluster(warm, chc.CHCConfig(progress=False, device="cpu", fit_sample=1000, min_cluster_size=20,
                                                    assign="umap", assign_knn="exact"))
    rows, exact = [], {}
    for seed in (0, 1):
        c0 = cpu()
        _, labels, _ = sampling.reduce_and_cluster(emb, chc.CHCConfig(progress=False, device="cpu", fit_sample=0, seed=seed))
        exact[seed] = labels
        rows.append({"run": f"exact seed {seed}", "cpu_s": cpu() - c0, "n_topics": int(labels.max()) + 1,
                     "noise_share": float((labels < 0).mean()), **agreement(exact[0], labels), "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    ref = exact[0]
    checked = False
    for size in [int(s) for s in args.samples.split(",")]:
        fraction = size / n
        for seed in [int(s) for s in args.seeds.split(",")]:
            picked = sampling.sample_indices(n, size, seed)
            rest = np.setdiff1d(np.arange(n), picked, assume_unique=True)
            sample_emb = np.ascontiguousarray(emb[picked])
            c0 = cpu()
            idx, dist = sampling.nearest_in_sample(emb[rest], sample_emb, base.umap_neighbors, "cpu")
            weights = sampling.membership_weights(dist, base.umap_neighbors)
            neighbours_cpu = cpu() - c0
            layouts = {}
            for name, (mcs_rule, ms_rule, nn, assign) in GRID.items():
                if nn not in layouts:
                    c0 = cpu()
                    coords = reduction.reduce_umap(sample_emb, chc.CHCConfig(**{**base.__dict__, "umap_neighbors": nn, "seed": seed}))
                    layouts[nn] = (coords, cpu() - c0)
                coords, umap_cpu = layouts[nn]
                mcs = sample_size_rule(base.min_cluster_size, fraction, mcs_rule)
                ms = min(mcs, sample_size_rule(base.min_samples, fraction, ms_rule))
                c0 = cpu()
                clusterer = hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms, prediction_data=assign == "umap").fit(coords)
                sample_labels = np.asarray(clusterer.labels_, dtype=np.int64)
                labels = np.empty(n, dtype=np.int64)
                labels[picked] = sample_labels
                rest_coords = sampling.transform_coords(idx, weights, coords)
                if assign == "knn":
                    labels[rest] = sampling.vote(idx, weights, sample_labels)
                elif assign == "umap":
                    labels[rest] = hdbscan.approximate_predict(clusterer, rest_coords)[0]
                else:
                    every = np.empty((n, coords.shape[1]), dtype=np.float32)
                    every[picked], every[rest] = coords, rest_coords
                    labels = np.asarray(hdbscan.HDBSCAN(min_cluster_size=base.min_cluster_size, min_samples=base.min_samples)
                                        .fit(every).labels_, dtype=np.int64)
                fit_cpu = cpu() - c0
                if not checked and name in ("umap (the old default)", "knn (the new default)"):
                    _, lib, _ = sampling.reduce_and_cluster(emb, chc.CHCConfig(progress=False, device="cpu", fit_sample=size, seed=seed,
                                                                               assign=assign, assign_knn="exact"))
                    if not np.array_equal(lib, labels):
                        raise SystemExit(f"grid variant {name!r} differs from the library's sampled path")
                    checked = name == "knn (the new default)"
                topics = labels[labels >= 0]
                rows.append({"run": name, "sample": size, "fraction": fraction, "seed": seed, "sample_min_cluster_size": mcs,
                             "sample_min_samples": ms, "umap_neighbors": nn, "assign": assign,
                             "n_topics": len(np.unique(topics)), "noise_share": float((labels < 0).mean()),
                             **agreement(ref, labels),
                             "ari_sampled_captions": agreement(ref[picked], labels[picked])["ari_all"],
                             "ari_assigned_captions": agreement(ref[rest], labels[rest])["ari_all"],
                             "cpu_s": umap_cpu + neighbours_cpu + fit_cpu, "load": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"n": n, "rows": rows}, indent=1))
    print_grid(rows)
    return 0


def print_grid(rows):
    """Markdown: one line per (variant, sample size), the mean over the seeds (min-max for the ARIs)."""
    import numpy as np

    print("\n| run | sample (fraction) | seeds | sizes on the sample (mcs / ms) | topics | noise share "
          "| ARI all captions: mean (min-max) | ARI in a topic in both (share) | ARI sampled / assigned captions | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "sample" not in r:
            print(f"| {r['run']} | all | 1 | 100 / 10 | {r['n_topics']} | {r['noise_share']:.3f} | {r['ari_all']:.3f} "
                  f"| {r['ari_in_topic_both']:.3f} ({r['in_topic_both']:.3f}) | - | {r['cpu_s']:.1f} |")
    groups = {}
    for r in rows:
        if "sample" in r:
            groups.setdefault((r["run"], r["sample"]), []).append(r)
    for (name, size), rs in groups.items():
        m = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        ari = [r["ari_all"] for r in rs]
        sizes = sorted({f"{r['sample_min_cluster_size']} / {r['sample_min_samples']}" for r in rs})
        print(f"| {name} | {size} ({rs[0]['fraction']:.2f}) | {len(rs)} | {', '.join(sizes)} | {m('n_topics'):.0f} "
              f"| {m('noise_share'):.3f} | **{np.mean(ari):.3f}** ({min(ari):.3f}-{max(ari):.3f}) "
              f"| {m('ari_in_topic_both'):.3f} ({m('in_topic_both'):.3f}) "
              f"| {m('ari_sampled_captions'):.3f} / {m('ari_assigned_captions'):.3f} | {m('cpu_s'):.1f} |")


def replicated(base, n, noise, seed=0, chunk=65_536):
    """``n`` embeddings: base[i mod len(base)] plus Gaussian noise, L2-normalised, built a chunk at a time."""
    import numpy as np

    out = np.empty((n, base.shape[1]), dtype=np.float32)
    g = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        x = base[rows % len(base)] + noise * g.standard_normal((len(rows), base.shape[1]), dtype=np.float32)
        out[rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def run_one(args) -> dict:
    """In this (fresh) process: build_hierarchy on ``args.n`` captions with the default CHCConfig (but
    ``--fit-sample``)."""
    import hdbscan
    import torch

    torch.set_num_threads(args.threads)
    from gram_plugin import chc
    from gram_plugin.chc import clustering, reduction, sampling

    captions, ids, base = real_corpus(args)
    n = args.n
    if n <= len(captions):
        captions, ids, emb = captions[:n], ids[:n], base[:n]
    else:
        emb = replicated(base, n, args.noise)
        captions = [captions[i % len(captions)] for i in range(n)]
        ids = [f"{ids[i % len(ids)]}/{i // len(ids)}" for i in range(n)]  # replica r of image x: its own image
    # warm-up, timed apart: numba's JIT of UMAP, HDBSCAN's prediction, the membership weights
    warm = replicated(base[:3000], 3000, args.noise, seed=1)
    chc.build_hierarchy(captions[:3000], embeddings=warm, config=chc.CHCConfig(progress=False, device="cpu", fit_sample=1000,
                                                                                min_cluster_size=20))
    clock = StageClock()
    clock.wrap(reduction, "exact_cosine_knn", "knn")
    clock.wrap(reduction, "reduce_umap", "umap")
    clock.wrap(clustering, "fit_hdbscan", "hdbscan")
    clock.wrap(sampling, "nearest_in_sample", "neighbours")
    clock.wrap(sampling.SampleIndex, "__init__", "index")
    clock.wrap(sampling.SampleIndex, "query", "neighbours")
    clock.wrap(hdbscan, "approximate_predict", "predict")
    clock.wrap(sampling, "vote", "predict")  # the default assign="knn"
    cfg = chc.CHCConfig(progress=False, device="cpu", **({} if args.fit_sample is None else {"fit_sample": args.fit_sample}))
    rss0 = _status_kib("VmRSS") / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    _reset_peak()
    clock._enter("total")
    h = chc.build_hierarchy(captions, image_ids=ids, embeddings=emb, config=cfg)
    clock._exit()
    clock.stages["rest"] = clock.stages.pop("total")
    return {"n": n, "replicated": n > len(base), "noise": args.noise if n > len(base) else 0.0, "threads": args.threads,
            "fit": h["fit"], "n_topics": h["n_topics"], "noise_share": round(h["noise"]["share"], 4), "stages": clock.stages,
            "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "rss_before_mib": rss0,
            "peak_rss_mib": max(s["peak_rss_mib"] for s in clock.stages.values()),
            "embeddings_mib": emb.nbytes / 2**20}


def run_growth(args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        load0, utc0 = os.getloadavg()[0], time.strftime("%H:%M:%S", time.gmtime())
        cmd = [sys.executable, __file__, "growth", "--n", str(n), "--threads", str(args.threads), "--noise", str(args.noise),
               "--captions", args.captions, "--cache-dir", args.cache_dir]
        cmd += [] if args.fit_sample is None else ["--fit-sample", str(args.fit_sample)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"n={n}: failed\n{res.stderr[-3000:]}", flush=True)
            break
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(load_start=load0, load_end=os.getloadavg()[0], utc=[utc0, time.strftime("%H:%M:%S", time.gmtime())])
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"n={n}: " + ", ".join(f"{s} {v['cpu_s']:.1f} cpu-s/{v['wall_s']:.1f} s/{v['peak_rss_mib']:.0f} MiB"
                                     for s, v in row["stages"].items())
              + f"; total {row['cpu_s']:.0f} cpu-s; topics {row['n_topics']}, noise {row['noise_share']:.3f}; "
                f"load {load0:.2f} -> {row['load_end']:.2f}", flush=True)
    print_stage_fits([r for r in rows if r["fit"]["path"] == "sampled"], STAGES, (3.1e6,), label="fit (sampled runs)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["ari", "grid", "growth"])
    p.add_argument("--samples", default="5000,10000,20000", help="ari, grid: fit_sample sizes")
    p.add_argument("--seeds", default="0,1,2", help="grid: the seeds of the sample (and of its UMAP)")
    p.add_argument("--sizes", default="40961,250000,500000,1000000", help="growth: corpus sizes")
    p.add_argument("--noise", type=float, default=0.01, help="growth: per-dimension noise of the replicas")
    p.add_argument("--fit-sample", type=int, help="growth: CHCConfig.fit_sample (default: CHCConfig's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--captions", default=str(CAPTIONS))
    p.add_argument("--cache-dir", default="/tmp/perf-chc-cache", help="embedding cache of the real captions")
    p.add_argument("--out", default="/tmp/chc_cc3m.json")
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.what in ("ari", "grid"):
        import torch

        torch.set_num_threads(args.threads)
        return run_ari(args) if args.what == "ari" else run_grid(args)
    if args.n:
        print(json.dumps(run_one(args)))
        return 0
    return run_growth(args)


if __name__ == "__main__":
    sys.exit(main())
