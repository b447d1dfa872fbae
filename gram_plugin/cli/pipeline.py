"""The standalone path's steps, shared by the commands: backbone, data, model, meta-training, tuning."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from .options import CLIError
from .plan import Plan, plan
from .run_folder import Run


def load_data(args, plan: Plan, backbone) -> tuple[object, list[str]]:
    """The dataset of ``--data`` (listed, not yet encoded), checked for base-to-new use.

    Returns (dataset, unreadable paths left out by ``--skip-unreadable``). Raises ``DataError`` for a
    missing or malformed dataset, ``CLIError`` for one whose base or new classes would be fewer than 2."""
    from ..data import base_new_problem, load_dataset

    ds = load_dataset(plan.data.data, backbone.preprocess)
    unreadable: list[str] = []
    if plan.data.skip_unreadable:
        ds, unreadable = ds.without_unreadable()
    problem = base_new_problem(ds)
    if problem:  # before the run folder is written: base / new / H of a 1-class side would read 100 %
        raise CLIError(f"--data {plan.data.data}: {problem}")
    return ds, unreadable


def prepare_data(args, plan: Plan, ds, backbone, run: Run, unreadable: list[str] = ()):
    """Base/new train/test splits (``{"base_train", "base_test", "new_train", "new_test", "all_test"}``), with
    cached features when only text prompts are learned; ``base_train`` keeps at most ``--shots`` images a class."""
    from ..cache import FeatureCache
    from ..data import split_train_test, subsample_classes

    if unreadable:
        run.log(f"left out {len(unreadable)} unreadable images (--skip-unreadable): {unreadable[:5]}"
                f"{' ...' if len(unreadable) > 5 else ''}")
    cfg = plan.data
    if plan.prompt.mode == "coop" and not args.no_cache:
        cache_dir = Path(args.cache_dir) if args.cache_dir else run.path("feature_cache")
        ds = FeatureCache(cache_dir, progress=not args.quiet).attach(backbone, ds)
    train, test = split_train_test(ds, cfg.test_fraction, args.seed)
    out = {"all_test": test}
    for part in ("base", "new"):
        out[f"{part}_train"] = subsample_classes(train, part)
        out[f"{part}_test"] = subsample_classes(test, part)
    out["base_train"] = at_most_shots(out["base_train"], cfg.shots, args.seed)
    run.log(f"data {ds.name}: {len(ds)} images, {len(ds.classnames)} classes; base train "
            f"{len(out['base_train'])}, base test {len(out['base_test'])}, new test {len(out['new_test'])}")
    return out


def at_most_shots(dataset, shots: int, seed: int = 0):
    """``shots`` images of each class drawn with ``seed``; a class with ``shots`` or fewer keeps all of them, as
    Dassl's few-shot sampler does (``generate_fewshot_dataset`` without repeats); ``shots`` 0 keeps every image."""
    from ..data import few_shot

    by_class = dataset.indices_by_class().values()
    larger = [i for idx in by_class if len(idx) > shots for i in idx]
    if not shots or not larger:
        return dataset
    drawn = {id(item) for item in few_shot(dataset.subset(larger), shots, seed).items}  # subset shares the items
    keep = [i for idx in by_class if len(idx) <= shots for i in idx] + [i for i in larger if id(dataset.items[i]) in drawn]
    return dataset.subset(sorted(keep))


def build_model(plan: Plan, backbone, seed: int = 0):
    """The standalone model: a ``PromptedCLIP`` on ``backbone`` with the plan's prompt settings."""
    from ..models import PromptedCLIP

    return PromptedCLIP(backbone, seed=seed, **dataclasses.asdict(plan.prompt))


def task_source(tasks, shots: int, base_train):
    """The meta-training tasks of ``--tasks`` drawn from the base classes' training images (both paths).

    Raises ``DataError`` when the images cannot fill a task (too few classes or images per class)."""
    from ..data import NWayKShotTasks, PerDatasetTasks

    if tasks.tasks == "per-dataset":
        return PerDatasetTasks(base_train, shots=shots, k_support=tasks.k_support)
    return NWayKShotTasks(base_train, tasks.n_way, tasks.k_support, tasks.k_query)


def meta_train(args, plan: Plan, backbone, data, run: Run, method: str = "gram", run_dir=None, resume=False,
               source=None):
    """Meta-train the standalone model on tasks from ``data["base_train"]`` (or on ``source``, e.g. a corpus's
    CHC tasks); returns (PromptInit, history)."""
    from ..meta import MetaPromptTrainer
    from ..regulator import GradientRegulator

    model = build_model(plan, backbone, args.seed)
    if source is None:
        source = task_source(plan.tasks, plan.data.shots, data["base_train"])
    regulator = GradientRegulator.for_module(model) if method == "gram" else None
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=regulator, config=plan.meta,
                                metadata=model.config(), run_dir=run_dir)
    t0 = time.perf_counter()
    init = trainer.fit(source, resume=resume)
    hist = trainer.history
    if hist:
        run.log(f"meta-train ({method}): {len(hist)} steps to step {trainer.step} in {time.perf_counter() - t0:.1f}s, "
                f"meta loss {hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f}")
    return init, hist


def tune_and_eval(args, plan: Plan, backbone, data, run: Run, init=None, label: str = "coop", partial: str | None = None):
    """Tune a fresh model on ``base_train`` (from ``init`` if given); returns (model, history, final, prompt).

    ``partial``: where Ctrl-C stops the tuning, the prompt learned so far is saved as this file of the run
    folder (:func:`keep_partial_prompt`) before the interruption goes on (``KeyboardInterrupt`` saying so)."""
    from ..finetune import TuningInterrupted, evaluate_base_new, tune
    from ..prompts import PromptInit

    model = build_model(plan, backbone, args.seed)
    evaluate_fn = lambda: evaluate_base_new(model, data["base_test"], data["new_test"])  # noqa: E731
    try:
        hist = tune(model, data["base_train"], plan.tune, init=init, evaluate_fn=evaluate_fn, progress=not args.quiet,
                    log=lambda r: run.log(f"{label} epoch {r['epoch']}: loss {r['train_loss']:.3f} base {r['base']:.3f} "
                                          f"new {r['new']:.3f} H {r['H']:.3f}"))
    except TuningInterrupted as stop:
        if partial is None:
            raise
        raise KeyboardInterrupt(keep_partial_prompt(run, model, stop, label, partial)) from None
    final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
    prompt = PromptInit.from_module(model, **model.config(), tuned_from=label)
    return model, hist, final, prompt


def keep_partial_prompt(run: Run, model, stop, label: str, name: str) -> str:
    """Save the prompt tuning had learned when Ctrl-C stopped it (``stop``: ``TuningInterrupted``) as ``name`` in
    the run folder (never the finished prompt's name), its metadata and ``metrics.json`` marking it interrupted;
    returns what to tell the user (an ``--overwrite`` run discards it with the rest: :meth:`Run.__exit__`)."""
    from ..prompts import PromptInit

    where = {"epoch": stop.epoch, "step": stop.step, "of_epochs": stop.epochs}
    path = PromptInit.from_module(model, **model.config(), tuned_from=label, interrupted=where).save(run.path(name))
    run.write_metrics({"interrupted": where, "partial_prompt": name, "per_epoch": stop.history})
    return f"{stop}; the prompt learned so far is saved as {path} (metrics.json marks the run interrupted)"


def check_init_fits(plan: Plan, backbone, seed: int) -> None:
    """Names, shapes and backbone of the init against the model it will go into, before data is read."""
    if plan.init is None:
        return
    from ..prompts import PromptInitError, prompt_parameters

    problems = plan.init.check_against(prompt_parameters(build_model(plan, backbone, seed)), backbone=backbone.name)
    if problems:
        raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))


def start(args, data: bool = True):
    """Check everything, build the backbone, list the data (unless ``data`` is False: returns (plan, backbone));
    the run folder is not touched yet."""
    p = plan(args)  # before torch is imported: a bad option fails at once
    import torch

    from ..backbones import build_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone)
    p.prompt.check_backbone(backbone)
    check_init_fits(p, backbone, args.seed)
    if not data:
        return p, backbone
    ds, unreadable = load_data(args, p, backbone)
    return p, backbone, ds, unreadable


@contextlib.contextmanager
def command(args):
    """Check everything, then lock and open the run folder and prepare the data: (plan, backbone, data, run)."""
    p, backbone, ds, unreadable = start(args)
    with open_run(args) as run:
        yield p, backbone, prepare_data(args, p, ds, backbone, run, unreadable), run


def open_run(args) -> Run:
    """Lock and open ``--out`` (every input already checked); its ``config.yaml`` records the options."""
    config = {k: v for k, v in vars(args).items() if k not in ("func", "config") and not k.startswith("_")}
    return Run(args.out, config, resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False),
               resumable=hasattr(args, "resume"))


def table(rows: dict[str, dict]) -> str:
    """Accuracy (%) rows on base / new / H / all as a text table."""
    width = max(14, *(len(name) + 2 for name in rows))
    head = f"{'method':<{width}}{'base':>8}{'new':>8}{'H':>8}{'all':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * m[k]:>8.1f}" for k in ("base", "new", "H", "all")))
    return "\n".join(lines)


def meta_curve(history: list[dict]) -> list[dict]:
    """Meta-training's loss per step for metrics.json."""
    # a skipped (non-finite) step has no loss: null in metrics.json, which never holds NaN
    return [{"step": r["step"], "meta_loss": None if r["skipped"] else r["meta_loss"]} for r in history]
