"""GRAM as the paper runs it: ONE init + regulator meta-learned from an image-caption corpus per seed,
used unchanged on every target (issue 23, part 2).

    GRAM_SHARED_DATA=/work/shared/data python benchmarks/corpus_eval.py --out /tmp/corpus-eval \
        [--seeds 1 2 3 4 5] [--shots 4 16] [--targets caltech101 imagenet-mini fashion-mnist]

The corpus: Flickr8k-1k (``flickr8k-1k.tar``: 1,000 photos x 5 captions), disjoint from every target.
CHC (gram_plugin.chc): the captions' Sentence-BERT embeddings -> UMAP -> HDBSCAN topics named by
c-TF-IDF; k-means on the images' features (the backbone's frozen image tower, through the
FeatureCache) splits each topic into visual domains. Built once (``--corpus-dir``), shared by the seeds.

Per seed:

1. meta-training (second order unless ``--first-order``), every init from "a photo of a":
   ``gram-corpus``: GRAM (init + regulator) on CHC domain-shift tasks of the corpus (support from one
   visual domain of each topic, query from all its items); ``gram-base`` / ``maml-base``: GRAM and
   MAML-clip on N-way tasks of Caltech101's base classes (protocols.py's setting, per-target
   meta-training done once on the cross-dataset source); the ablations ``gram-corpus-nodomain`` (the
   same topics, support and query from all domains) and ``gram-corpus-random`` (random image groups of
   the topics' sizes instead of topics, named and split into domains the same way).
2. on every target and shot count, the rows of ``ROWS`` (the corpus init and regulator are the same
   files on every target); cross-dataset: the Caltech101-tuned prompts evaluated on the other sets.

Reuses protocols.py's data loading, tuning settings, paired differences, report and merge.
Writes ``results.json`` (after every seed), ``RESULTS.md`` and ``corpus.md`` (the hierarchy) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import protocols as P  # noqa: E402
from gram_plugin import PromptInit  # noqa: E402
from gram_plugin import chc  # noqa: E402
from gram_plugin.backbones import build_backbone  # noqa: E402
from gram_plugin.cache import FeatureCache  # noqa: E402
from gram_plugin.data import ImageDataset, Item, NWayKShotTasks, extract_archive, few_shot  # noqa: E402
from gram_plugin.finetune import evaluate, evaluate_base_new, tune  # noqa: E402
from gram_plugin.prompts import prompt_parameters  # noqa: E402

class Row(NamedTuple):
    init: str | None  # key of a meta-learned init (None: "a photo of a")
    regulator: bool = False  # tune through the init's regulator
    prograd: bool = False
    tuned: bool = True  # False: the init evaluated as it is


ROWS = OrderedDict([
    ("zero-shot", Row(None, tuned=False)),
    ("CoOp", Row(None)),
    ("CoOp+GRAM(corpus)", Row("gram-corpus", regulator=True)),
    ("CoOp+GRAM(base tasks)", Row("gram-base", regulator=True)),
    ("CoOp+MAML-clip", Row("maml-base")),
    ("CoOp+ProGrad", Row(None, prograd=True)),
    ("GRAM(corpus)+ProGrad", Row("gram-corpus", regulator=True, prograd=True)),
    ("GRAM(corpus) init, untuned", Row("gram-corpus", tuned=False)),
    ("corpus init only", Row("gram-corpus")),
    ("corpus regulator only", Row("regulator-only", regulator=True)),
    ("GRAM(corpus, no domain split)", Row("gram-corpus-nodomain", regulator=True)),
    ("GRAM(corpus, random groups)", Row("gram-corpus-random", regulator=True)),
])
ABLATION_ROWS = ("GRAM(corpus) init, untuned", "corpus init only", "corpus regulator only", "GRAM(corpus, no domain split)",
                 "GRAM(corpus, random groups)")


# -- the corpus -------------------------------------------------------------------------------------
def corpus_features(backbone, args) -> tuple[list[str], list[str], torch.Tensor]:
    """(captions, image id per caption, image features in order of first appearance)."""
    root = extract_archive("flickr8k-1k.tar", args.data_dir, args.cache_dir) / "flickr8k-1k"
    captions, ids = chc.read_captions(root / "captions.txt")
    order = list(dict.fromkeys(ids))  # CHC's image order: first appearance in the captions
    files = sorted(order)  # the cache key hashes the file list: one fixed order
    images = ImageDataset([Item(str(root / "images" / f), 0) for f in files], ["photo"], backbone.preprocess,
                          "flickr8k-1k")
    feats = FeatureCache(args.feature_cache, progress=not args.quiet).features(backbone, images)
    row = {f: i for i, f in enumerate(files)}
    return captions, ids, feats[[row[i] for i in order]]


def corpus_hierarchy(backbone, args) -> tuple[dict, torch.Tensor, list[str]]:
    """The CHC hierarchy of the corpus (built once into --corpus-dir), its image features, its captions."""
    captions, ids, feats = corpus_features(backbone, args)
    path = args.corpus_dir / "hierarchy.json"
    if path.exists():
        h = chc.load_hierarchy(path)
    else:
        cfg = chc.CHCConfig(min_cluster_size=args.min_cluster_size, min_samples=args.min_samples,
                            n_domains=args.n_domains, progress=not args.quiet)
        h = chc.build_hierarchy(captions, ids, feats.numpy(), cfg, cache_dir=args.corpus_dir / "cache")
        chc.save_hierarchy(h, path)
    return h, feats, captions


def without_domain_split(h: dict) -> dict:
    """The same topics with one domain each (support and query then come from all of a topic's images)."""
    return {**h, "topics": [{**t, "domains": [list(t["items"])]} for t in h["topics"]]}


def random_groups(h: dict, captions: list[str], feats: torch.Tensor, n_domains: int, seed: int = 0) -> dict:
    """Random image groups of the topics' sizes instead of topics, named by c-TF-IDF and split into domains
    by k-means like CHC's topics (the ablation "random caption groups instead of topics")."""
    rng = np.random.default_rng(seed)
    items = np.array([i for t in h["topics"] for i in t["items"]])
    rng.shuffle(items)
    sizes = [len(t["items"]) for t in h["topics"]]
    groups = np.split(items, np.cumsum(sizes)[:-1])
    caption_item = np.array(h["caption_item"])
    docs = [" ".join(captions[c] for c in np.nonzero(np.isin(caption_item, g))[0]) for g in groups]
    vocab, scores, counts = chc.ctfidf(docs)
    ranked, _ = chc.rank_words(vocab, scores, counts, 10)
    names = chc.unique_names(ranked, sizes)
    topics = []
    for k, g in enumerate(groups):
        g = np.sort(g)
        dom = chc.kmeans_domains(feats[g].numpy(), n_domains, seed)
        topics.append({"id": k, "name": names[k], "words": ranked[k], "items": g.tolist(),
                       "domains": [g[dom == d].tolist() for d in range(int(dom.max()) + 1)]})
    return {**h, "topics": topics}


def describe_hierarchy(h: dict, captions: list[str], examples: int = 2) -> str:
    """Markdown: topics, sizes, domains, noise and a few captions per topic."""
    sizes = [len(t["items"]) for t in h["topics"]]
    lines = [f"{h['n_captions']} captions of {h['n_items']} images -> {h['n_topics']} topics "
             f"(images per topic: min {min(sizes)}, median {int(np.median(sizes))}, max {max(sizes)}); "
             f"noise: {h['noise']['count']} captions ({100 * h['noise']['share']:.1f} %, policy {h['noise']['policy']}), "
             f"{h['noise']['items_without_topic']} images in no topic; domains per topic "
             f"{h['config']['n_domains']} (k-means on image features). CHC settings: "
             + ", ".join(f"{k} {h['config'][k]}" for k in ("min_cluster_size", "min_samples", "cluster_selection_method",
                                                           "umap_neighbors", "umap_components")) + ".", "",
             "| topic | images | domain sizes | top words | example captions |", "|---|---|---|---|---|"]
    for t in sorted(h["topics"], key=lambda t: -len(t["items"])):
        ex = "; ".join(captions[c] for c in t.get("captions", [])[:examples])
        words = ", ".join(w for w, _ in t["words"][:4])
        lines.append(f"| {t['name']} | {len(t['items'])} | {'/'.join(str(len(d)) for d in t['domains'])} | {words} | {ex} |")
    return "\n".join(lines)


# -- meta-training ----------------------------------------------------------------------------------
def meta_train(backbone, source, args, seed, regulator: bool, track_alignment: bool = False):
    """protocols.meta_train with this script's settings (same MetaConfig fields)."""
    return P.meta_train(backbone, source, args, seed, regulator, track_alignment=track_alignment)


def regulator_only(backbone, seed, gram_init: PromptInit) -> PromptInit:
    """The handcrafted "a photo of a" context with the corpus-learned regulator."""
    model = P.new_model(backbone, seed)
    init = PromptInit.from_module(model, **{**gram_init.metadata, "method": "regulator-only"})
    init.regulator_state = {k: v.clone() for k, v in gram_init.regulator_state.items()}
    return init


def diagnose(init: PromptInit, backbone, train, seed) -> dict:
    """How far meta-training moved the context from "a photo of a" (relative norm), and what the learned
    regulator does to a downstream gradient (the CoOp loss on ``train``'s few-shot images at that init):
    ||R(g)|| / ||g|| and cos(R(g), g)."""
    from gram_plugin import GradientRegulator

    start = P.new_model(backbone, seed)
    ref = prompt_parameters(start)
    out = {"ctx_drift": float(sum((init.tensors[n] - p.detach()).norm() ** 2 for n, p in ref.items()) ** 0.5
                              / sum(p.detach().norm() ** 2 for p in ref.values()) ** 0.5)}
    reg = GradientRegulator.from_init(init)
    if reg is None:
        return out
    model = P.new_model(backbone, seed)
    init.apply_to(model, backbone=backbone.name)
    params = prompt_parameters(model)
    model.set_classnames(train.classnames)
    batch = train.batch(list(range(len(train))))
    grads = torch.autograd.grad(model.loss(batch), list(params.values()))
    with torch.no_grad():
        g = torch.cat([x.flatten() for x in grads])
        r = torch.cat([reg(n, x).flatten() for n, x in zip(params, grads)])
    out.update(reg_gain=float(r.norm() / g.norm()), reg_cos=float(torch.nn.functional.cosine_similarity(r, g, dim=0)))
    return out


# -- tuning ----------------------------------------------------------------------------------------
def run_row(row, backbone, data, shots, seed, inits, args):
    model = P.new_model(backbone, seed)
    key, use_reg, prograd, tuned = ROWS[row]
    if not tuned:
        if key:
            inits[key].apply_to(model, backbone=backbone.name)
        return model, evaluate_base_new(model, data["base_test"], data["new_test"])
    train = data["base_train"]
    per_class = min(len(ix) for ix in train.indices_by_class().values())
    train = few_shot(train, min(shots, per_class), seed)
    init = inits[key] if key else None
    start = dict(init.tensors) if init else {n: p.detach().clone() for n, p in prompt_parameters(model).items()}
    tune(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=init, use_regulator=use_reg,
         prograd_lambda=1.0 if prograd else None, seed=seed, progress=False, optimizer=args.optimizer)
    out = evaluate_base_new(model, data["base_test"], data["new_test"])
    # how far tuning moved the context from where it started (relative norm): does the init survive tuning?
    end = prompt_parameters(model)
    out["tune_drift"] = float(sum((end[n].detach() - t).norm() ** 2 for n, t in start.items()) ** 0.5
                              / sum(t.norm() ** 2 for t in start.values()) ** 0.5)
    return model, out


def init_keys(rows) -> list[str]:
    keys = {ROWS[r].init for r in rows if ROWS[r].init}
    if "regulator-only" in keys:
        keys.add("gram-corpus")
    return [k for k in ("gram-corpus", "gram-base", "maml-base", "gram-corpus-nodomain", "gram-corpus-random",
                        "regulator-only") if k in keys]


def rows_for(target: str, shots: int, args) -> list[str]:
    """The rows run on ``target`` at ``shots``: ablations on --ablation-target at the fewest shots only, and
    at more shots only --rows-more-shots (the cost cut stated in RESULTS.md)."""
    rows = [r for r in args.rows if r not in ABLATION_ROWS or (target == args.ablation_target and shots == min(args.shots))]
    if shots != min(args.shots):
        rows = [r for r in rows if r in args.rows_more_shots]
    return [r for r in rows if target in args.row_targets.get(r, [target])]


def header(results, args, seconds) -> list[str]:
    n = len(results["seeds_done"])
    # a merge reports the settings its parts ran with (saved in results.json), not the merge call's defaults
    settings = results.get("settings") or settings_line(args)
    return ["# GRAM from an image-caption corpus (ProxyCLIP v2, real images)", "", "Produced by", "",
            f"    {args.command_line}", "",
            f"Seeds {results['seeds_done']} ({n} of {args.seeds} finished); accuracy % (mean ± std over seeds); "
            f"{seconds / 60:.1f} min. Backbone `{results['backbone']}`. Corpus: {results['corpus']['summary']} "
            + settings, "",
            "Paired columns: per-seed difference to CoOp with the same seed (same few-shot images), in points: "
            "mean ± std over seeds, the paired t statistic, and on how many seeds the row is above CoOp.", ""]


def settings_line(args) -> str:
    """The tuning / meta-training / task settings of a run, as the report states them."""
    return (f"Tuning: {args.optimizer} lr {args.lr}, {args.epochs} epochs, batch {args.batch_size}. Meta-training: "
            f"{args.meta_steps} outer steps x {args.meta_batch} tasks, {args.inner_steps} inner steps at lr "
            f"{args.inner_lr}, outer Adam lr {args.outer_lr}, regulator Adam lr {args.regulator_lr} "
            f"({args.regulator_scale} scale), clipping gamma 5, "
            + ("first-order" if args.first_order else "second-order") + " meta-gradients; corpus tasks "
            f"{args.corpus_way}-way, {args.corpus_shots} support images from one visual domain + "
            f"{args.corpus_queries} query images per topic; base tasks {args.n_way}-way {args.k_support}+"
            f"{args.k_query} shots of Caltech101 base classes. Ablation rows on {args.ablation_target} only.")


def join_rows(main: dict, extra: dict) -> dict:
    """``main`` plus the rows only ``extra`` has (another run of other rows on the same seeds), each seed's
    values put at that seed's place in ``main``'s order, so the paired differences stay seed by seed."""
    missing = set(main["seeds_done"]) - set(extra["seeds_done"])
    if missing:
        raise ValueError(f"the joined run lacks seeds {sorted(missing)}")
    if extra["backbone"] != main["backbone"]:
        raise ValueError(f"runs on different backbones: {main['backbone']} vs {extra['backbone']}")
    where = [extra["seeds_done"].index(s) for s in main["seeds_done"]]
    for target, by_shots in extra["base2new"].items():
        for shots, slot in by_shots.items():
            dst = main["base2new"].get(target, {}).get(shots)
            if dst is None:
                continue
            for row, vals in slot["final"].items():
                if row not in dst["final"]:
                    dst["final"][row] = {k: [xs[i] for i in where] for k, xs in vals.items()}
    for row, by_target in extra["cross"]["acc"].items():
        if row not in main["cross"]["acc"] and all(by_target.values()):
            main["cross"]["acc"][row] = {t: [xs[i] for i in where] for t, xs in by_target.items()}
    for field in ("meta_seconds", "meta_loss", "diagnostics"):
        for key, vals in extra.get(field, {}).items():
            main.setdefault(field, {}).setdefault(key, [vals[i] for i in where])
    return main


def diagnostics_report(results) -> list[str]:
    """Markdown: what meta-training did to each init and regulator, and how far tuning moved each row's context."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ["## Diagnostics", "", "Per meta-learned init (mean over seeds): meta-training loss first -> last outer "
             "step; ctx drift = ||init - \"a photo of a\"|| / ||\"a photo of a\"||; the regulator on a downstream "
             "gradient (CoOp loss on 4 Caltech101 base shots per class at the init): ||R(g)|| / ||g|| and cos(R(g), g).",
             "", "| init | seeds | meta loss | ctx drift | regulator gain | cos(R(g), g) |", "|---|---|---|---|---|---|"]
    for key, diags in results.get("diagnostics", {}).items():
        ml = results.get("meta_loss", {}).get(key, [])
        loss = f"{mean([a for a, _ in ml]):.3f} -> {mean([b for _, b in ml]):.3f}" if ml else "-"
        gain = f"{mean([d['reg_gain'] for d in diags]):.3f}" if "reg_gain" in diags[0] else "-"
        cos = f"{mean([d['reg_cos'] for d in diags]):.3f}" if "reg_cos" in diags[0] else "-"
        lines.append(f"| {key} | {len(diags)} | {loss} | {mean([d['ctx_drift'] for d in diags]):.2f} | {gain} | {cos} |")
    lines += ["", "Tuning drift (||tuned context - starting context|| / ||starting context||, mean over seeds):", "",
              "| target, shots | " + " | ".join(["row", "drift"]) + " |", "|---|---|---|"]
    for target, by_shots in results["base2new"].items():
        for shots, slot in by_shots.items():
            for row, vals in slot["final"].items():
                if vals.get("tune_drift"):
                    lines.append(f"| {target}, {shots} | {row} | {mean(vals['tune_drift']):.2f} |")
    return lines + [""]


def write_outputs(results, args, t0) -> str:
    seconds = time.perf_counter() - t0
    results["seconds"] = seconds
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = P.report(results, args, seconds, methods=list(args.rows), header_lines=header(results, args, seconds))
    text += "\n" + "\n".join(diagnostics_report(results))
    (args.out / "RESULTS.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    P.add_setting_args(p)
    p.add_argument("--targets", nargs="+", default=["caltech101", "imagenet-mini", "fashion-mnist"],
                   choices=["caltech101", "imagenet-mini", "fashion-mnist"])
    p.add_argument("--cross-source", default="caltech101")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--rows-more-shots", nargs="+", default=list(ROWS), choices=list(ROWS),
                   help="the rows also run at the larger shot counts (default: all)")
    p.add_argument("--row-targets", nargs="+", default=[], metavar="ROW=TARGET,TARGET",
                   help="run ROW on these targets only (default: every target)")
    p.add_argument("--target-shots", nargs="+", default=[], metavar="TARGET:K,K",
                   help="shot counts of one target (default: --shots), e.g. imagenet-mini:4")
    p.add_argument("--ablation-target", default="caltech101", help="the one target the ablation rows run on")
    p.add_argument("--corpus-dir", type=Path, default=Path("/tmp/gram-corpus"),
                   help="where the corpus hierarchy is built once (shared by the seeds' processes)")
    p.add_argument("--min-cluster-size", type=int, default=30)
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--n-domains", type=int, default=3)
    p.add_argument("--corpus-way", type=int, default=5)
    p.add_argument("--corpus-shots", type=int, default=4)
    p.add_argument("--corpus-queries", type=int, default=8)
    p.add_argument("--alignment", action="store_true",
                   help="log cos(support grad, query grad) during the corpus meta-training (one more backward per task)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only report: join the results.json of these output folders (same settings, other seeds)")
    p.add_argument("--join", type=Path, nargs="+", default=None,
                   help="with --merge: add the rows of these runs (other rows, the same seeds), seed by seed")
    args = p.parse_args(argv)
    args.command_line = "python benchmarks/corpus_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.report = None
    args.row_targets = {r: ts.split(",") for r, _, ts in (x.rpartition("=") for x in args.row_targets)}
    args.target_shots = {t: [int(k) for k in ks.split(",")] for t, _, ks in (x.partition(":") for x in args.target_shots)}
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads((d / "results.json").read_text()) for d in args.merge]
        settings = {r.get("settings") for r in parts}
        if len(settings) > 1:
            raise SystemExit(f"--merge: the runs have different settings: {sorted(map(str, settings))}")
        results = P.merge_results(parts)
        if args.join:
            extra = [json.loads((d / "results.json").read_text()) for d in args.join]
            results = join_rows(results, P.merge_results(extra))
            args.rows += [r for r in ROWS if r not in args.rows and any(
                r in slot["final"] for by in results["base2new"].values() for slot in by.values())]
            args.command_line += "  # --join: " + ", ".join(f"{d} ({r['seeds_done']})" for d, r in zip(args.join, extra))
        args.seeds = results["seeds_done"]
        args.command_line += "  # joins " + ", ".join(f"{d} ({r['seeds_done']})" for d, r in zip(args.merge, parts))
        t0 = time.perf_counter() - max(r["seconds"] for r in parts)
        print(write_outputs(results, args, t0))
        return 0
    t0 = time.perf_counter()
    backbone = build_backbone(args.backbone)
    data = P.load_data(backbone, args)
    h, feats, captions = corpus_hierarchy(backbone, args)
    corpus_md = describe_hierarchy(h, captions)
    (args.out / "corpus.md").write_text(corpus_md + "\n")
    print(corpus_md.splitlines()[0], flush=True)
    print(f"[corpus-eval] data and corpus ready in {time.perf_counter() - t0:.0f}s", flush=True)
    chc_source = lambda hier: chc.CHCTaskSource(hier, features=feats, n_way=args.corpus_way,  # noqa: E731
                                                shots=args.corpus_shots, queries=args.corpus_queries)
    sources = {"gram-corpus": chc_source(h),
               "gram-base": NWayKShotTasks(data[args.cross_source]["base_train"], args.n_way, args.k_support, args.k_query)}
    sources["maml-base"] = sources["gram-base"]
    keys = init_keys(args.rows)
    if "gram-corpus-nodomain" in keys:
        sources["gram-corpus-nodomain"] = chc_source(without_domain_split(h))
    if "gram-corpus-random" in keys:
        sources["gram-corpus-random"] = chc_source(random_groups(h, captions, feats, args.n_domains))
    cross_shots = max(args.shots)
    results = {"backbone": backbone.weights_id(), "settings": settings_line(args), "seeds_done": [], "base2new": {}, "alignment_history": [],
               "meta_seconds": {}, "seed_seconds": {}, "meta_loss": {},
               "corpus": {"summary": corpus_md.splitlines()[0], "n_topics": h["n_topics"],
                          "usable_topics": len(sources["gram-corpus"].topics)},
               "cross": {"source": args.cross_source, "shots": cross_shots, "targets": list(data["cross"]),
                         "acc": {m: {t: [] for t in data["cross"]} for m in args.rows}},
               "chance": {**{f"{t} base/new": 100 / len(data[t]["base_test"].classnames) for t in args.targets},
                          **{t: 100 / len(ds.classnames) for t, ds in data["cross"].items()}}}
    for seed in args.seeds:
        t_seed = time.perf_counter()
        torch.manual_seed(seed)
        inits = {}
        for key in keys:
            if key == "regulator-only":
                inits[key] = regulator_only(backbone, seed, inits["gram-corpus"])
                continue
            init, hist, secs = meta_train(backbone, sources[key], args, seed, regulator=key != "maml-base",
                                          track_alignment=key == "gram-corpus" and args.alignment)
            inits[key] = init
            results["meta_seconds"].setdefault(key, []).append(secs)
            results["meta_loss"].setdefault(key, []).append([hist[0]["meta_loss"], hist[-1]["meta_loss"]])
            if key != "regulator-only":
                few = few_shot(data[args.cross_source]["base_train"], 4, seed)
                diag = diagnose(init, backbone, few, seed)
                results.setdefault("diagnostics", {}).setdefault(key, []).append(diag)
                print(f"[corpus-eval] seed {seed} {key} " + " ".join(f"{k} {v:.3f}" for k, v in diag.items()), flush=True)
            if key == "gram-corpus" and args.alignment:
                results["alignment_history"].append([{k: r[k] for k in ("align_raw", "align_regulated")} for r in hist])
            print(f"[corpus-eval] seed {seed} meta-train {key}: {secs:.0f}s, meta loss "
                  f"{hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f}", flush=True)
        for target in args.targets:
            for shots in args.shots:
                if shots not in args.target_shots.get(target, args.shots):
                    continue
                rows = rows_for(target, shots, args)
                slot = results["base2new"].setdefault(target, {}).setdefault(str(shots), {
                    "final": {m: {"base": [], "new": [], "H": []} for m in rows}, "per_epoch": {}})
                per_class = min(len(ix) for ix in data[target]["base_train"].indices_by_class().values())
                slot["effective_shots"] = min(shots, per_class)
                for row in rows:
                    t1 = time.perf_counter()
                    model, final = run_row(row, backbone, data[target], shots, seed, inits, args)
                    for k, v in final.items():
                        slot["final"][row].setdefault(k, []).append(v)
                    if target == args.cross_source and shots == cross_shots:
                        for t, ds in data["cross"].items():
                            results["cross"]["acc"][row][t].append(evaluate(model, ds))
                    print(f"[corpus-eval] seed {seed} {target} {shots}-shot {row:<30} base {100 * final['base']:.1f} "
                          f"new {100 * final['new']:.1f} H {100 * final['H']:.1f} ({time.perf_counter() - t1:.0f}s)",
                          flush=True)
        results["seeds_done"].append(seed)
        results["seed_seconds"][str(seed)] = time.perf_counter() - t_seed
        write_outputs(results, args, t0)
        print(f"[corpus-eval] seed {seed} done in {time.perf_counter() - t_seed:.0f}s", flush=True)
    print(write_outputs(results, args, t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
