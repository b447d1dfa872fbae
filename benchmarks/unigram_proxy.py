"""UNIGRAM on ProxyCLIP v2: text context + pixel-space visual prompt, meta-learned jointly.

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/unigram_proxy.py --out /tmp/unigram \
        [--seeds 1 2 3] [--shots 16] [--image-size 128] [--first-order]

Methods, all on the same backbone at the same input size, tuned on K shots of Caltech101 BASE
classes (the protocols' split: ``data.benchmark_sets``, split seed 0), evaluated on base / new and
cross-dataset (Fashion-MNIST, ants/bees, ImageNet-mini) like benchmarks/protocols.py:

* zero-shot: "a photo of a {}." (text prompt only, nothing learned);
* CoOp: text context from "a photo of a" (features cached: the image tower never changes);
* CoOp+GRAM: text context meta-learned with the regulator (GRAM), tuned with it;
* CoOp+VP: text context + pixel prompt (Bahng et al. 2022, padding layout, zero init) tuned
  jointly, no meta-learning (isolates what the pixel prompt alone adds);
* UNIGRAM: text context + pixel prompt meta-learned jointly with the regulator (per-channel head
  for the pixel prompt: gram_plugin/pixel_prompt.py), tuned with it.

Meta-training tasks: N-way K-shot tasks from Caltech101 BASE-class training images only (the same
task stream for CoOp+GRAM and UNIGRAM at a given seed); nothing here is chosen on a test set.
The pixel prompt changes the image features, so CoOp+VP and UNIGRAM run the CNN at every step
(benchmarks/README.md, "Pixel prompts: the cost of uncached images").

Writes ``results.json`` after every seed and ``unigram.md`` (tables, per-seed paired differences)
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocols import add_data_args, add_training_args, fmt, paired  # noqa: E402  (the protocols' helpers)

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer  # noqa: E402
from gram_plugin.cache import FeatureCache  # noqa: E402
from gram_plugin.data import NWayKShotTasks, benchmark_sets, few_shot  # noqa: E402
from gram_plugin.finetune import evaluate, evaluate_base_new, tune  # noqa: E402
from gram_plugin.models import PromptedCLIP  # noqa: E402
from gram_plugin.backbones.proxy_v2 import ProxyCLIPv2  # noqa: E402

METHODS = ("zero-shot", "CoOp", "CoOp+GRAM", "CoOp+VP", "UNIGRAM")
PIXEL_METHODS = ("CoOp+VP", "UNIGRAM")  # images through the tower at every step
CTX_INIT = "a photo of a"
TARGET = "caltech101"


def new_model(backbone, method, seed):
    mode = "unigram" if method in PIXEL_METHODS else "coop"
    return PromptedCLIP(backbone, mode=mode, n_ctx=len(CTX_INIT.split()), ctx_init=CTX_INIT, seed=seed)


def meta_train(backbone, method, source, args, seed):
    model = new_model(backbone, method, seed)
    cfg = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                     regulator_lr=args.regulator_lr, meta_batch_size=args.meta_batch, steps=args.meta_steps,
                     clip_gamma=5.0, seed=seed, first_order=args.first_order, progress=False)
    reg = GradientRegulator.for_module(model, scale="relative")
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg, metadata=model.config())
    t0 = time.perf_counter()
    init = trainer.fit(source)
    return init, trainer.history, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    add_data_args(p)
    p.add_argument("--image-size", type=int, default=128,
                   help="input side of the image tower for EVERY method here (224 = the checkpoint's; the shared "
                        "images are at most 128 px on their longer side)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--eval-per-class", type=int, default=10,
                   help="base/new test images per class (a fixed draw, the same for every method and seed; 0 = all): "
                        "pixel-prompted models run the CNN on every test image")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_training_args(p)  # the tuning and meta-training settings of benchmarks/protocols.py
    p.add_argument("--first-order", action="store_true",
                   help="first-order meta-gradients for both meta-learned methods (the regulator still learns)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only combine the results.json of runs with different --seeds (run in parallel) into --out")
    args = p.parse_args(argv)
    args.command_line = "python benchmarks/unigram_proxy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    backbone = ProxyCLIPv2(image_size=args.image_size)
    cache = FeatureCache(args.feature_cache, progress=False)
    images = benchmark_sets(backbone.preprocess, args.data_dir, args.cache_dir, split_seed=0)
    feats = benchmark_sets(backbone.preprocess, args.data_dir, args.cache_dir, split_seed=0,
                           attach=lambda ds: cache.attach(backbone, ds))
    print(f"[unigram] data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.eval_per_class:
        for sets_ in (images, feats):  # the same items in both (same split, same draw)
            for part in ("base_test", "new_test"):
                sets_[TARGET][part] = few_shot(sets_[TARGET][part], args.eval_per_class, seed=0)
    sets = {m: (images if m in PIXEL_METHODS else feats) for m in METHODS}
    results = {"backbone": backbone.weights_id(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()},
               "load_start": load_start, "seeds_done": [], "final": {m: {"base": [], "new": [], "H": []} for m in args.methods},
               "cross": {m: {t: [] for t in feats["cross"]} for m in args.methods},
               "seconds": {m: [] for m in args.methods}, "meta_seconds": {}, "meta_loss": {}}
    per_class = min(len(ix) for ix in feats[TARGET]["base_train"].indices_by_class().values())
    for seed in args.seeds:
        for method in args.methods:
            t1 = time.perf_counter()
            data = sets[method][TARGET]
            model = new_model(backbone, method, seed)
            if method != "zero-shot":
                init = None
                if method in ("CoOp+GRAM", "UNIGRAM"):
                    source = NWayKShotTasks(data["base_train"], args.n_way, args.k_support, args.k_query)
                    init, hist, secs = meta_train(backbone, method, source, args, seed)
                    results["meta_seconds"].setdefault(method, []).append(secs)
                    results["meta_loss"].setdefault(method, []).append([hist[0]["meta_loss"], hist[-1]["meta_loss"]])
                    print(f"[unigram] seed {seed} {method} meta-train {secs:.0f}s, meta loss "
                          f"{hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f}", flush=True)
                train = few_shot(data["base_train"], min(args.shots, per_class), seed)
                tune(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=init,
                     use_regulator=True, seed=seed, progress=False, optimizer=args.optimizer)
            final = evaluate_base_new(model, data["base_test"], data["new_test"])
            for k in ("base", "new", "H"):
                results["final"][method][k].append(final[k])
            for t, ds in sets[method]["cross"].items():
                results["cross"][method][t].append(evaluate(model, ds))
            results["seconds"][method].append(time.perf_counter() - t1)
            print(f"[unigram] seed {seed} {method:<10} base {100 * final['base']:.1f} new {100 * final['new']:.1f} "
                  f"H {100 * final['H']:.1f} cross " + " ".join(f"{t} {100 * v[-1]:.1f}" for t, v in
                                                             results["cross"][method].items())
                  + f" ({time.perf_counter() - t1:.0f}s)", flush=True)
            results["load_end"] = os.getloadavg()
            results["total_seconds"] = time.perf_counter() - t0
            # after every method: a cut run keeps what it finished
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
        results["seeds_done"].append(seed)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "unigram.md").write_text(report(results, args, per_class))
    print(report(results, args, per_class))
    return 0


def merge(args) -> int:
    """One report from runs that differ only in ``--seeds`` (same settings, checked)."""
    runs = [json.loads((d / "results.json").read_text()) for d in args.merge]
    settings = [{k: v for k, v in r["args"].items() if k not in ("seeds", "out", "command_line")} for r in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit("--merge: the runs differ in more than --seeds")
    run_args = argparse.Namespace(**runs[0]["args"])
    run_args.command_line = " ; ".join(f"`{r['args']['command_line']}`" for r in runs) + f" ; then `{args.command_line}`"
    out = {"backbone": runs[0]["backbone"], "seeds_done": [s for r in runs for s in r["seeds_done"]],
           "load_start": max(r["load_start"] for r in runs), "load_end": max(r["load_end"] for r in runs),
           "total_seconds": max(r["total_seconds"] for r in runs), "parallel_runs": len(runs)}
    for key in ("final", "cross"):
        out[key] = {m: {k: [x for r in runs if r["seeds_done"] for x in r[key][m][k]] for k in runs[0][key][m]}
                    for m in runs[0][key]}
    out["seconds"] = {m: [x for r in runs if r["seeds_done"] for x in r["seconds"][m]] for m in runs[0]["seconds"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    text = report(out, run_args, run_args.shots)
    (args.out / "unigram.md").write_text(text)
    print(text)
    return 0


def report(results, args, per_class) -> str:
    methods = args.methods
    fin, cross = results["final"], results["cross"]
    ref = "CoOp" if "CoOp" in methods else None
    cmd = args.command_line if args.command_line.startswith("`") else f"`{args.command_line}`"
    par = results.get("parallel_runs", 1)
    lines = [f"Produced by {cmd} (seeds finished: {results['seeds_done']}; "
             f"{results['total_seconds'] / 60:.0f} min at 1 thread per run"
             + (f", {par} runs side by side" if par > 1 else "") + " on the shared 2-core CPU, load average "
             f"{results['load_start'][0]:.1f} at start, {results['load_end'][0]:.1f} at end). Backbone "
             f"`{results['backbone']}`: ProxyCLIP v2 at {args.image_size} px for every method here"
             + (" (224 px is the checkpoint's size and the protocol tables' input; compare rows of this table "
                "with each other, not with those)" if args.image_size != 224 else "")
             + f". Caltech101, {min(args.shots, per_class)} shots per base class, tested on "
             + (f"{args.eval_per_class} held-out images per class (one fixed draw)" if args.eval_per_class else
                "all held-out images") + f"; tuning {args.optimizer} lr {args.lr}, "
             f"{args.epochs} epochs, batch {args.batch_size}; meta-training {args.meta_steps} outer steps x "
             f"{args.meta_batch} tasks ({args.n_way}-way, {args.k_support}+{args.k_query} shots, Caltech101 base-class "
             f"training images only), {args.inner_steps} inner steps at lr {args.inner_lr}, outer Adam lr "
             f"{args.outer_lr}, regulator Adam lr {args.regulator_lr} (relative scale), clipping gamma 5, "
             + ("first-order" if args.first_order else "second-order") + " meta-gradients. "
             "Pixel prompt: padding layout, border "
             f"{round(30 * args.image_size / 224)} px, zero init, per-channel regulator head.", "",
             "| method | base | new | H | new vs CoOp (paired) | H vs CoOp (paired) |", "|---|---|---|---|---|---|"]
    for m in methods:
        r = fin[m]
        vs = (paired(r["new"], fin[ref]["new"]), paired(r["H"], fin[ref]["H"])) if ref and m != ref else ("-", "-")
        lines.append(f"| {m} | {fmt(r['base'])} | {fmt(r['new'])} | {fmt(r['H'])} | {vs[0]} | {vs[1]} |")
    targets = list(next(iter(cross.values())))
    lines += ["", "Cross-dataset (the Caltech101-tuned prompts, zero-shot elsewhere):", "",
              "| method | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(fmt(cross[m][t]) for t in targets) + " |")
    if "UNIGRAM" in methods and "CoOp+GRAM" in methods:
        u, g = fin["UNIGRAM"], fin["CoOp+GRAM"]
        lines += ["", f"UNIGRAM vs CoOp+GRAM (paired, points): base {paired(u['base'], g['base'])}, "
                      f"new {paired(u['new'], g['new'])}, H {paired(u['H'], g['H'])}."]
    if "UNIGRAM" in methods and "CoOp+VP" in methods:
        u, v = fin["UNIGRAM"], fin["CoOp+VP"]
        lines += ["", f"UNIGRAM vs CoOp+VP (paired, points): base {paired(u['base'], v['base'])}, "
                      f"new {paired(u['new'], v['new'])}, H {paired(u['H'], v['H'])}."]
    seeds = results["seeds_done"]
    lines += ["", "Per seed (base / new / H; the paired differences above are taken seed by seed):", "",
              "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for m in methods:
        r = fin[m]
        lines.append(f"| {m} | " + " | ".join(f"{100 * r['base'][i]:.1f} / {100 * r['new'][i]:.1f} / {100 * r['H'][i]:.1f}"
                                             for i in range(len(seeds))) + " |")
    secs = {m: sum(v) / len(v) for m, v in results["seconds"].items() if v}
    lines += ["", "Seconds per seed (meta-training + tuning + evaluation): "
              + ", ".join(f"{m} {s:.0f}" for m, s in secs.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
