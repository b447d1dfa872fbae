"""``gram-plugin demo``: GRAM as it is meant to be used -- an init + regulator meta-learned once from an
image-caption corpus, applied to the demo's classes -- beside zero-shot and CoOp (and GRAM meta-trained on
the demo's own base classes, for comparison).

The corpus init shipped in the package (``gram_plugin/assets/corpus_init``) is made by the command in its
``manifest.json`` (``gram-plugin meta-train --tasks chc:<flickr8k-1k> ...``); tests/test_corpus_init.py
re-runs that command and checks the output equals the shipped file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .options import DEMO_SETTINGS, CLIError, add_meta, add_shots, add_standalone_command, add_tasks, add_tuning
from .pipeline import build_model, meta_curve, meta_train, open_run, prepare_data, start, table, tune_and_eval

CORPUS_INIT_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus_init"
CORPUS_INIT = CORPUS_INIT_DIR / "init.safetensors"  # GRAM meta-trained on CHC tasks of flickr8k-1k (ProxyCLIP v2)
CORPUS_INIT_MANIFEST = CORPUS_INIT_DIR / "manifest.json"  # the command that made it, the corpus' sha256, the commit


def add_parser(sub) -> None:
    """Add ``demo`` and its flags to the sub-parsers ``sub``."""
    p = add_standalone_command(sub, "demo", help="zero-shot, CoOp, CoOp + GRAM learned from an image-caption corpus "
                               "(and GRAM meta-trained on the base classes) on base/new/H")
    p.add_argument("--corpus-init", dest="corpus_init", default=str(CORPUS_INIT),
                   help="GRAM init + regulator meta-learned on an image-caption corpus (meta-train --tasks "
                        "chc:CORPUS); default: the one shipped in the package, made for the default backbone "
                        "by the command in gram_plugin/assets/corpus_init/manifest.json")
    add_shots(p)
    add_tuning(p)
    add_tasks(p)
    add_meta(p)
    p.set_defaults(func=cmd_demo, **DEMO_SETTINGS)


def shipped_corpus_init_command() -> str:
    """The documented command that makes the shipped corpus init (from its manifest)."""
    return json.loads(CORPUS_INIT_MANIFEST.read_text(encoding="utf-8"))["command"]


def load_corpus_init(path, plan, backbone, seed: int):
    """The ``--corpus-init`` file, read and checked against the demo's model (names, shapes, backbone).

    Raises ``CLIError`` naming ``--corpus-init`` when the file cannot be read or does not fit."""
    from ..errors import GramPluginError
    from ..prompts import PromptInit, prompt_parameters

    try:
        init = PromptInit.load(path, what="--corpus-init file")
    except (GramPluginError, OSError) as e:
        raise CLIError(str(e)) from None
    problems = init.check_against(prompt_parameters(build_model(plan, backbone, seed)), backbone=backbone.name)
    if not init.regulator_state:
        problems.append("it holds no regulator (meta-train it with --method gram)")
    if problems:
        how = (f"; the shipped one is for the default backbone: for --backbone {backbone.name} make one with "
               f"`gram-plugin meta-train --tasks chc:CORPUS --backbone ... --out RUN` and pass --corpus-init "
               "RUN/init.safetensors" if Path(path).resolve() == CORPUS_INIT else "")
        raise CLIError(f"--corpus-init {path} does not fit the demo's model:\n  - " + "\n  - ".join(problems) + how)
    return init


def cmd_demo(args) -> int:
    """Zero-shot, CoOp, CoOp+GRAM(corpus) and CoOp+GRAM(base classes) on base / new / H into one run folder
    (metrics.json, accuracy.png with zero-shot as horizontal lines, the inits and the tuned prompt)."""
    t0 = time.perf_counter()
    p, backbone, ds, unreadable = start(args)
    corpus_init = load_corpus_init(args.corpus_init, p, backbone, args.seed)  # before the run folder is touched
    with open_run(args) as run:
        from ..finetune import evaluate_base_new

        data = prepare_data(args, p, ds, backbone, run, unreadable)
        run.log(f"corpus init: {args.corpus_init} (meta-trained on {describe_source(corpus_init)})")
        # the handcrafted prompt ("a photo of a {class}."), untuned: what tuning should not lose on new classes
        zero_shot = evaluate_base_new(build_model(p, backbone, args.seed), data["base_test"], data["new_test"],
                                      data["all_test"])
        _, coop_hist, coop_final, _ = tune_and_eval(args, p, backbone, data, run, init=None, label="coop")
        _, corpus_hist, corpus_final, corpus_prompt = tune_and_eval(args, p, backbone, data, run, init=corpus_init,
                                                                    label="gram-corpus")
        base_init, meta_hist = meta_train(args, p, backbone, data, run, method="gram")
        _, base_hist, base_final, _ = tune_and_eval(args, p, backbone, data, run, init=base_init, label="gram-base")
        base_init.save(run.path("init.safetensors"), overwrite=True)
        corpus_prompt.save(run.path("prompt.safetensors"), overwrite=True)
        results = table({"zero-shot": zero_shot, "CoOp": coop_final, "CoOp+GRAM(corpus)": corpus_final,
                         "CoOp+GRAM(base classes)": base_final})
        print(results)
        run.log("results (accuracy %, held-out images):\n" + results)
        metrics = {"final": {"zero-shot": zero_shot, "coop": coop_final, "coop+gram(corpus)": corpus_final,
                             "coop+gram(base classes)": base_final},
                   "per_epoch": {"coop": coop_hist, "coop+gram(corpus)": corpus_hist,
                                 "coop+gram(base classes)": base_hist},
                   "corpus_init": {"file": str(args.corpus_init), "source_tasks": corpus_init.metadata.get("source_tasks")},
                   "meta_train": meta_curve(meta_hist),
                   "backbone": backbone.name, "data": p.data.data, "seconds": time.perf_counter() - t0}
        run.write_metrics(metrics)
        curves = {f"{name} {part}": [r[part] for r in hist]
                  for name, hist in (("CoOp", coop_hist), ("CoOp+GRAM(corpus)", corpus_hist),
                                     ("CoOp+GRAM(base)", base_hist)) for part in ("base", "new")}
        run.plot(curves, lines={"zero-shot base": zero_shot["base"], "zero-shot new": zero_shot["new"]},
                 title=f"base-to-new on {p.data.data} ({backbone.name})")
        run.log(f"wrote {run.path('metrics.json')} and {run.path('accuracy.png')} in {time.perf_counter() - t0:.1f}s")
    return 0


def describe_source(init) -> str:
    """Where an init's meta-training tasks came from, in a few words (for the log)."""
    src = init.metadata.get("source_tasks") or {}
    if src.get("kind") == "chc":
        return (f"CHC tasks of {src.get('n_topics', '?')} topics of an image-caption corpus, {src.get('n_way')}-way "
                f"{src.get('shots')} + {src.get('queries')}")
    return src.get("kind", "tasks not recorded")
