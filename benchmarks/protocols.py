"""The seeds' evaluation protocols, at small scale, on real images with ProxyCLIP v2 (the default backbone).

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/protocols.py --out /tmp/protocols \
        --report benchmarks/RESULTS.md [--seeds 1 2 3 4 5] [--shots 4 16] [--quick]

Backbone: ``--backbone`` (default ``proxy`` = ProxyCLIP v2: frozen ImageNet EfficientNet-Lite0 + ConSE
into the pretrained MiniLM text tower; benchmarks/PROXY.md). Image features come from the library's
FeatureCache: the frozen image tower runs once per image, ever (only text prompts are learned).

Data (``gram_plugin.data.benchmark_sets``): Caltech101 and ImageNet-mini split 50/50 per class with a
fixed split (seed 0; the seeds change the few-shot draw, the meta-training tasks and the init),
base/new by the CoOp rule (sorted classes, first half base). Fashion-MNIST keeps its train/test parts.

Protocols (what each seed's paper reports, scaled down):

1. base-to-new: tune on K shots of the base classes, test on held-out base images and on the new
   classes (``--targets``, default Caltech101 and ImageNet-mini).
2. cross-dataset: prompts tuned on ``--cross-source`` base (largest shot count), evaluated zero-shot on
   Fashion-MNIST, ants-vs-bees (hymenoptera) and ImageNet-mini (all 100 classes).
3. shots: every K in ``--shots`` (capped by what a class has: ImageNet-mini has 5 training images).

Tuning uses Adam by default (CoOp uses SGD for 200 epochs; a few epochs on this CPU need an adaptive step).
Methods: zero-shot handcrafted prompt "a photo of a {}."; CoOp (ctx initialised from the same
phrase); CoOp + meta-init (MAML + meta-gradient clipping, no regulator); CoOp + GRAM (meta-init +
regulator, the regulator also shapes every tuning step); CoOp + ProGrad (lambda 1).
Meta-training tasks: N-way K-shot tasks drawn from Caltech101 BASE-class training images only (no
new class, no test image; labelled tasks: GRAM's CHC tasks need captioned images, unavailable here).
Every method is compared with CoOp seed by seed (paired differences).

Writes ``results.json`` (after every seed, so a cut run keeps its finished seeds),
``accuracy_per_epoch.png``, ``alignment.png`` into ``--out`` and the markdown tables into ``--report``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
from gram_plugin.backbones import build_backbone
from gram_plugin.cache import FeatureCache
from gram_plugin.data import NWayKShotTasks, benchmark_sets, few_shot
from gram_plugin.finetune import evaluate, evaluate_base_new, tune
from gram_plugin.models import PromptedCLIP
from gram_plugin.stats import mean_sd, paired_difference

METHODS = ("zero-shot", "CoOp", "CoOp+MAML-clip", "CoOp+GRAM", "CoOp+ProGrad")
CTX_INIT = "a photo of a"


# -- data -------------------------------------------------------------------------------------------
def load_data(backbone, args) -> dict:
    cache = FeatureCache(args.feature_cache, progress=not args.quiet)
    return benchmark_sets(backbone.preprocess, args.data_dir, args.cache_dir, split_seed=0,
                          attach=lambda ds: cache.attach(backbone, ds), targets=args.targets)


# -- methods ----------------------------------------------------------------------------------------
def new_model(backbone, seed):
    return PromptedCLIP(backbone, mode="coop", n_ctx=len(CTX_INIT.split()), ctx_init=CTX_INIT, seed=seed)


def meta_train(backbone, source, args, seed, regulator: bool, track_alignment: bool | None = None):
    """Meta-train MAML-clip (``regulator=False``) or GRAM from "a photo of a"; (init, history, seconds).
    ``track_alignment`` (default: with the regulator) logs GRAM Fig. 3b's cosines at one more backward per task."""
    model = new_model(backbone, seed)
    cfg = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                     regulator_lr=args.regulator_lr, meta_batch_size=args.meta_batch, steps=args.meta_steps,
                     clip_gamma=5.0, seed=seed, track_alignment=regulator if track_alignment is None else track_alignment,
                     first_order=args.first_order,
                     progress=not args.quiet)
    reg = GradientRegulator.for_module(model, scale=args.regulator_scale) if regulator else None
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg, metadata=model.config())
    t0 = time.perf_counter()
    init = trainer.fit(source)
    return init, trainer.history, time.perf_counter() - t0


def run_method(method, backbone, data, shots, seed, inits, args, curves=False):
    """Tune one method on one target; the final model, per-epoch base/new/H (when ``curves``), final numbers."""
    model = new_model(backbone, seed)
    if method == "zero-shot":
        return model, [], evaluate_base_new(model, data["base_test"], data["new_test"])
    train = data["base_train"]
    per_class = min(len(ix) for ix in train.indices_by_class().values())
    train = few_shot(train, min(shots, per_class), seed)
    init = {"CoOp+MAML-clip": inits.get("maml"), "CoOp+GRAM": inits.get("gram")}.get(method)
    hist = tune(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=init,
                use_regulator=True, prograd_lambda=1.0 if method == "CoOp+ProGrad" else None, seed=seed,
                evaluate_fn=(lambda: evaluate_base_new(model, data["base_test"], data["new_test"])) if curves else None,
                progress=False, optimizer=args.optimizer)
    return model, hist, evaluate_base_new(model, data["base_test"], data["new_test"])


# -- report -----------------------------------------------------------------------------------------
def mean_std(xs):
    return mean_sd([100 * x for x in xs])


def fmt(xs):
    m, s = mean_std(xs)
    return f"{m:.1f} ± {s:.1f}"


def paired(xs, ref) -> str:
    """Per-seed differences (points) of ``xs`` against ``ref`` (same seeds): mean ± std, paired t, #positive."""
    n = min(len(xs), len(ref))
    if not n:
        return "-"
    return paired_difference([100 * a for a in xs[:n]], [100 * b for b in ref[:n]]).format()


def header(results, args, seconds) -> list[str]:
    n_seeds = len(results["seeds_done"])
    return ["# Small-scale protocol results (ProxyCLIP v2, real images)", "",
            "Produced by", "", f"    {args.command_line}", "",
            f"Seeds {results['seeds_done']} ({n_seeds} of {args.seeds} finished); accuracy % (mean ± std over seeds); "
            f"{seconds / 60:.1f} min on the shared 2-core CPU (1 thread). Backbone `{results['backbone']}` "
            "(benchmarks/PROXY.md: its image tower saw all ImageNet-1k labels, so ImageNet-mini cells are "
            f"near-supervised). Tuning: {args.optimizer} lr {args.lr}, {args.epochs} epochs, batch {args.batch_size}; "
            f"meta-training: {args.meta_steps} outer steps x {args.meta_batch} tasks ({args.n_way}-way, "
            f"{args.k_support} support + {args.k_query} query shots per class, from Caltech101 base-class training "
            f"images only), {args.inner_steps} inner steps at lr {args.inner_lr}, outer Adam lr {args.outer_lr} "
            f"(GRAM's regulator: Adam lr {args.regulator_lr}, {args.regulator_scale} scale), meta-gradient clipping "
            "gamma 5" + (", first-order meta-gradients." if args.first_order else ", second-order meta-gradients."), "",
            "Paired columns: per-seed difference to CoOp with the same seed (same few-shot images), in points: "
            "mean ± std over seeds, the paired t statistic (mean / (std / sqrt(n)); |t| > 2.78 is p < 0.05 "
            "two-sided at 5 seeds), and on how many seeds the method is above CoOp.", ""]


def report(results, args, seconds, methods=METHODS, header_lines=None) -> str:
    """The markdown tables of ``results`` for the rows ``methods`` (a row a setting lacks is left out)."""
    lines = header(results, args, seconds) if header_lines is None else list(header_lines)
    for target in args.targets:
        for shots in args.shots:
            rows = results["base2new"].get(target, {}).get(str(shots))
            if not rows:
                continue
            eff = rows["effective_shots"]
            fin = rows["final"]
            lines += [f"## Base-to-new: {target}, {shots} shots" + (f" (capped at {eff})" if eff != shots else ""), "",
                      "| method | base | new | H | new vs CoOp (paired) | H vs CoOp (paired) |", "|---|---|---|---|---|---|"]
            for m in (m for m in methods if m in fin):
                r = fin[m]
                diff = ("-", "-") if m == "CoOp" or "CoOp" not in fin else (paired(r["new"], fin["CoOp"]["new"]),
                                                                            paired(r["H"], fin["CoOp"]["H"]))
                lines.append(f"| {m} | {fmt(r['base'])} | {fmt(r['new'])} | {fmt(r['H'])} | {diff[0]} | {diff[1]} |")
            lines.append("")
    cross = results["cross"]
    if any(cross["acc"][m][cross["targets"][0]] for m in cross["acc"]):
        lines += [f"## Cross-dataset: tuned on {cross['source']} base ({cross['shots']} shots), zero-shot elsewhere", "",
                  "| method | " + " | ".join(cross["targets"]) + " |", "|---" * (len(cross["targets"]) + 1) + "|"]
        methods = [m for m in methods if cross["acc"].get(m, {}).get(cross["targets"][0])]  # rows run there
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(fmt(cross["acc"][m][t]) for t in cross["targets"]) + " |")
        lines += ["", "Paired difference to CoOp (points):", "",
                  "| method | " + " | ".join(cross["targets"]) + " |", "|---" * (len(cross["targets"]) + 1) + "|"]
        for m in methods if "CoOp" in cross["acc"] else []:
            if m != "CoOp":
                lines.append(f"| {m} | " + " | ".join(paired(cross["acc"][m][t], cross["acc"]["CoOp"][t])
                                                      for t in cross["targets"]) + " |")
    lines += ["", "Chance: " + ", ".join(f"{k} {v:.1f}" for k, v in results["chance"].items()) + ".", ""]
    al = results.get("alignment")
    if al:
        lines += ["## Gradient alignment during GRAM meta-training (GRAM Fig. 3b)", "",
                  "cos(support gradient, query gradient) at the current init, raw vs after the regulator, "
                  "mean over the first / last 10 outer steps and seeds:", "",
                  "| | first 10 steps | last 10 steps |", "|---|---|---|",
                  f"| raw | {al['raw_first']:.3f} | {al['raw_last']:.3f} |",
                  f"| regulated | {al['reg_first']:.3f} | {al['reg_last']:.3f} |", "",
                  "Plots: `accuracy_per_epoch.png`, `alignment.png` (in the output folder and benchmarks/).", ""]
    return "\n".join(lines)


def plots(results, out: Path, shots) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = results["cross"]["source"]  # the setting tuned with per-epoch evaluation
    curves = results["base2new"][target][str(shots)]["per_epoch"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key in zip(axes, ("base", "new")):
        for m, runs in curves.items():
            ys = [100 * statistics.mean(r[e][key] for r in runs) for e in range(len(runs[0]))]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=m)
        zero = results["base2new"][target][str(shots)]["final"]["zero-shot"][key]
        if zero:
            ax.axhline(100 * statistics.mean(zero), color="grey", ls="--", lw=1, label="zero-shot")
        ax.set_title(f"{target} {key} classes ({shots} shots)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_epoch.png", dpi=100)
    plt.close(fig)
    hist = results["alignment_history"]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("align_raw", "raw gradient"), ("align_regulated", "regulated gradient")):
            ys = [statistics.mean(h[i][key] for h in hist) for i in range(len(hist[0]))]
            ax.plot(range(1, len(ys) + 1), ys, label=label)
        ax.set_xlabel("outer step")
        ax.set_ylabel("cos(support grad, query grad)")
        ax.set_title("GRAM meta-training: support/query gradient alignment")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "alignment.png", dpi=100)
        plt.close(fig)


# -- main -------------------------------------------------------------------------------------------
def summarise_alignment(results) -> dict:
    hist = results["alignment_history"]
    if not (hist and all(h and "align_raw" in h[0] for h in hist)):
        return {}
    n = min(10, len(hist[0]))
    avg = lambda key, sl: statistics.mean(r[key] for h in hist for r in h[sl])  # noqa: E731
    return {"raw_first": avg("align_raw", slice(0, n)), "raw_last": avg("align_raw", slice(-n, None)),
            "reg_first": avg("align_regulated", slice(0, n)), "reg_last": avg("align_regulated", slice(-n, None))}


def write_outputs(results, args, t0, cross_shots) -> str:
    """results.json, plots and the report: called after every seed, so a cut run keeps its seeds."""
    seconds = time.perf_counter() - t0
    results["seconds"] = seconds
    results["alignment"] = summarise_alignment(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.cross_source in results["base2new"] and str(cross_shots) in results["base2new"][args.cross_source]:
        plots(results, args.out, cross_shots)
    text = report(results, args, seconds)
    (args.out / "RESULTS.md").write_text(text)
    if args.report:
        args.report.write_text(text)
    return text


def merge_results(parts: list[dict]) -> dict:
    """One results dict from runs of the same settings on different seeds (lists joined in the given order)."""
    import copy

    out = copy.deepcopy(parts[0])
    for r in parts[1:]:
        if r["backbone"] != out["backbone"]:
            raise ValueError(f"runs on different backbones: {out['backbone']} vs {r['backbone']}")
        overlap = set(out["seeds_done"]) & set(r["seeds_done"])
        if overlap:
            raise ValueError(f"seeds {sorted(overlap)} appear in more than one run")
        out["seeds_done"] += r["seeds_done"]
        out["alignment_history"] += r["alignment_history"]
        out["seed_seconds"].update(r["seed_seconds"])
        for field in ("meta_seconds", "meta_loss", "diagnostics"):  # per-seed lists by init (meta_loss: corpus_eval.py)
            for key, vals in r.get(field, {}).items():
                out.setdefault(field, {}).setdefault(key, []).extend(vals)
        for target, by_shots in r["base2new"].items():
            for shots, slot in by_shots.items():
                dst = out["base2new"][target][shots]
                for m, vals in slot["final"].items():
                    for k, xs in vals.items():
                        dst["final"][m][k] += xs
                for m, runs in slot["per_epoch"].items():
                    dst["per_epoch"][m] += runs
        for m, by_target in r["cross"]["acc"].items():
            for t, xs in by_target.items():
                out["cross"]["acc"][m][t] += xs
    return out


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Where the shared data, its extracted copies and the feature cache live (also unigram_proxy.py)."""
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $GRAM_SHARED_DATA)")
    p.add_argument("--cache-dir", default=None, help="where archives are extracted (default: $GRAM_DATA_CACHE)")
    p.add_argument("--feature-cache", type=Path, default=Path.home() / ".cache" / "gram-plugin" / "features")


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The tuning and meta-training settings of every protocol script (also unigram_proxy.py)."""
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--meta-steps", type=int, default=50)
    p.add_argument("--meta-batch", type=int, default=2)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-support", type=int, default=4)
    p.add_argument("--k-query", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--inner-lr", type=float, default=0.05)
    p.add_argument("--outer-lr", type=float, default=0.01)
    p.add_argument("--regulator-lr", type=float, default=MetaConfig.regulator_lr,
                   help="Adam lr of GRAM's regulator (default: the library's, 1e-3)")


def add_setting_args(p: argparse.ArgumentParser) -> None:
    """Backbone, data and the tuning / meta-training settings (shared with meta_init_check.py)."""
    p.add_argument("--backbone", default="proxy", help="a backbones.build_backbone name (default: ProxyCLIP v2)")
    add_data_args(p)
    add_training_args(p)
    p.add_argument("--regulator-scale", choices=["relative", "absolute"], default="relative",
                   help="GradientRegulator scale (absolute = GRAM eq. 5-6 as written)")
    p.add_argument("--first-order", action="store_true", help="first-order meta-gradients (the regulator still learns)")
    p.add_argument("--quiet", action="store_true")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, default=None, help="markdown file for the tables")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    add_setting_args(p)
    p.add_argument("--targets", nargs="+", default=["caltech101", "imagenet-mini"],
                   choices=["caltech101", "imagenet-mini", "fashion-mnist"])
    p.add_argument("--cross-source", default="caltech101", help="target whose tuned prompts are evaluated cross-dataset")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, 4 shots, 2 epochs, 2 meta steps, Fashion-MNIST only")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only report: join the results.json of these output folders (runs of the same settings on "
                        "different seeds, e.g. two processes) and write the tables and plots into --out")
    args = p.parse_args(argv)
    args.command_line = "python benchmarks/protocols.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds, args.shots, args.epochs, args.meta_steps = args.seeds[:1], [4], 2, 2
        args.targets, args.cross_source, args.n_way = ["fashion-mnist"], "fashion-mnist", 3
    if args.cross_source not in args.targets:
        p.error(f"--cross-source {args.cross_source} must be one of --targets {args.targets}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads((d / "results.json").read_text()) for d in args.merge]
        results = merge_results(parts)
        args.seeds = results["seeds_done"]
        args.command_line += "  # joins " + ", ".join(f"{d} ({r['seeds_done']}, {r['seconds'] / 60:.0f} min)"
                                                      for d, r in zip(args.merge, parts))
        t0 = time.perf_counter() - max(r["seconds"] for r in parts)
        print(write_outputs(results, args, t0, max(args.shots)))
        return 0
    t0 = time.perf_counter()
    backbone = build_backbone(args.backbone)
    data = load_data(backbone, args)
    print(f"[protocols] data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    source = NWayKShotTasks(data["caltech101"]["base_train"], args.n_way, args.k_support, args.k_query)
    cross_shots = max(args.shots)
    results = {"backbone": backbone.weights_id(), "seeds_done": [], "base2new": {}, "alignment_history": [],
               "meta_seconds": {}, "seed_seconds": {},
               "cross": {"source": args.cross_source, "shots": cross_shots, "targets": list(data["cross"]),
                         "acc": {m: {t: [] for t in data["cross"]} for m in METHODS}},
               "chance": {**{f"{t} base/new": 100 / len(data[t]["base_test"].classnames) for t in args.targets},
                          **{t: 100 / len(ds.classnames) for t, ds in data["cross"].items()}}}
    cross_acc = results["cross"]["acc"]
    for seed in args.seeds:
        t_seed = time.perf_counter()
        torch.manual_seed(seed)
        inits = {}
        for key, reg in (("maml", False), ("gram", True)):
            init, hist, secs = meta_train(backbone, source, args, seed, reg)
            inits[key] = init
            results["meta_seconds"].setdefault(key, []).append(secs)
            if reg:
                results["alignment_history"].append([{k: h[k] for k in ("align_raw", "align_regulated")} for h in hist])
            print(f"[protocols] seed {seed} meta-train {key}: {secs:.0f}s, meta loss "
                  f"{hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f}", flush=True)
        for target in args.targets:
            for shots in args.shots:
                slot = results["base2new"].setdefault(target, {}).setdefault(str(shots), {
                    "final": {m: {"base": [], "new": [], "H": []} for m in METHODS},
                    "per_epoch": {m: [] for m in METHODS if m != "zero-shot"}})
                per_class = min(len(ix) for ix in data[target]["base_train"].indices_by_class().values())
                slot["effective_shots"] = min(shots, per_class)
                for m in METHODS:
                    t1 = time.perf_counter()
                    curves = target == args.cross_source and shots == cross_shots  # the plotted setting
                    model, hist, final = run_method(m, backbone, data[target], shots, seed, inits, args, curves)
                    for k in ("base", "new", "H"):
                        slot["final"][m][k].append(final[k])
                    if curves and hist:
                        slot["per_epoch"][m].append([{k: r[k] for k in ("base", "new", "H")} for r in hist])
                    if curves:
                        for t, ds in data["cross"].items():
                            cross_acc[m][t].append(evaluate(model, ds))
                    print(f"[protocols] seed {seed} {target} {shots}-shot {m:<15} base {100 * final['base']:.1f} "
                          f"new {100 * final['new']:.1f} H {100 * final['H']:.1f} ({time.perf_counter() - t1:.0f}s)",
                          flush=True)
        results["seeds_done"].append(seed)
        results["seed_seconds"][str(seed)] = time.perf_counter() - t_seed
        write_outputs(results, args, t0, cross_shots)
        print(f"[protocols] seed {seed} done in {time.perf_counter() - t_seed:.0f}s", flush=True)
    print(write_outputs(results, args, t0, cross_shots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
