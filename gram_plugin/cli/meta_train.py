"""``gram-plugin meta-train``: meta-learn a prompt init (+ GRAM's regulator) into RUN/init.safetensors.

One command, one set of flags, two models: the standalone ``PromptedCLIP`` (``--backbone``, ``--data``,
``--mode`` ...) or, given ``--dassl-config``, the user's own Dassl trainer (:mod:`gram_plugin.cli.dassl`).
Everything is checked (:func:`gram_plugin.cli.plan.plan`) before anything is loaded. Both write the
run folder ``--out``: ``init.safetensors``, ``config.yaml``, ``log.txt``, ``metrics.json`` and the
checkpoints in ``meta/`` that ``--resume`` continues from.
"""

from __future__ import annotations

from .options import (
    add_chc_tasks, add_dassl, add_general, add_meta, add_renamed, add_run_folder, add_shots, add_standalone, add_tasks,
)
from .pipeline import command, meta_curve, meta_train

DESCRIPTION = """Meta-learn a prompt init (and GRAM's gradient regulator) on tasks from base classes; writes
OUT/init.safetensors (plus config.yaml, log.txt, metrics.json, checkpoints in OUT/meta). The model is
the standalone PromptedCLIP (--backbone, --data, --mode ...) or, with --dassl-config, your own Dassl
trainer and config, built as your train.py builds it; the init then loads with
wrap(trainer, init="OUT/init.safetensors", regulator=True) or GRAM.INIT."""


def add_parser(sub) -> None:
    """Add ``meta-train`` (both paths, one set of flags) to the sub-parsers ``sub``."""
    p = sub.add_parser("meta-train", help="meta-learn a prompt init (+ regulator) -> OUT/init.safetensors; standalone "
                       "or through your own Dassl trainer (--dassl-config)", description=DESCRIPTION)
    add_run_folder(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (OUT/meta)")
    add_general(p)
    tasks = add_tasks(p)
    add_shots(tasks)
    add_chc_tasks(p)
    add_standalone(p.add_argument_group("the standalone model and data (default)"))
    add_dassl(p)
    add_meta(p)
    add_renamed(p, "--steps", "--meta-batch", "--run-dir", "--no-progress", "--no-regulator", "--regulator")
    p.set_defaults(func=cmd_meta_train)


def cmd_meta_train(args) -> int:
    """Meta-train (standalone or through the Dassl trainer) into the run folder."""
    if args.dassl_config is not None:
        from .dassl import meta_train_through_dassl

        return meta_train_through_dassl(args)
    if args.tasks.startswith("chc:"):
        return meta_train_on_corpus(args)
    with command(args) as (p, backbone, data, run):
        init, hist = meta_train(args, p, backbone, data, run, method=args.method, run_dir=run.path("meta"),
                                resume=args.resume)
        path = init.save(run.path("init.safetensors"), overwrite=True)
        run.write_metrics({"meta_train": meta_curve(hist),
                           "meta_steps": init.metadata["meta_steps"], "skipped_steps": init.metadata["skipped_steps"]})
        run.log(f"wrote {path}")
    return 0


def meta_train_on_corpus(args) -> int:
    """The standalone model meta-trained on GRAM's tasks of an image-caption corpus (``--tasks chc:CORPUS``):
    no labelled data; the hierarchy, its report and picture go into the run folder."""
    from pathlib import Path

    from .corpus import corpus_hierarchy, corpus_task_source
    from .pipeline import open_run, start

    p, backbone = start(args, data=False)
    with open_run(args) as run:
        cache_dir = None if args.no_cache else (Path(args.cache_dir) if args.cache_dir else run.path("feature_cache"))
        result = corpus_hierarchy(p, run, cache_dir, backbone=backbone, resume=args.resume)
        # text prompts alone: the frozen tower's features; a visual prompt needs the pixels
        images = {} if p.prompt.mode == "coop" else {"transform": backbone.preprocess}
        source = corpus_task_source(p, result, **images)
        init, hist = meta_train(args, p, backbone, None, run, method=args.method, run_dir=run.path("meta"),
                                resume=args.resume, source=source)
        path = init.save(run.path("init.safetensors"), overwrite=True)
        run.write_metrics({"meta_train": meta_curve(hist), "meta_steps": init.metadata["meta_steps"],
                           "skipped_steps": init.metadata["skipped_steps"], "source_tasks": source.describe()})
        run.log(f"wrote {path}")
    return 0
