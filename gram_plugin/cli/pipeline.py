"""The standalone path's steps, shared by the commands: backbone, data, model, meta-training, tuning."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from ..backbones import build_backbone
from .plan import Plan, plan
from .options import CLIError
from .run_folder import Run


def load_data(args, plan: Plan, backbone) -> tuple[object, list[str]]:
    """The dataset (listed, not yet encoded), checked for base-to-new use; (dataset, unreadable paths)."""
    from ..data import load_dataset

    ds = load_dataset(plan.data.data, backbone.preprocess)
    if len(ds.classnames) < 2:
        raise CLIError(f"dataset {ds.name} has {len(ds.classnames)} class ({ds.classnames}): base-to-new "
                       "evaluation needs at least 2 classes (the second half are the new ones): this one has no new classes")
    unreadable: list[str] = []
    if plan.data.skip_unreadable:
        ds, unreadable = ds.without_unreadable()
    return ds, unreadable


def prepare_data(args, plan: Plan, ds, backbone, run: Run, unreadable: list[str] = ()):
    """Base/new train/test splits, with cached features when only text prompts are learned."""
    from ..cache import FeatureCache
    from ..data import few_shot, split_train_test, subsample_classes

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
    if cfg.shots:
        out["base_train"] = few_shot(out["base_train"], cfg.shots, args.seed)
    run.log(f"data {ds.name}: {len(ds)} images, {len(ds.classnames)} classes; base train "
            f"{len(out['base_train'])}, base test {len(out['base_test'])}, new test {len(out['new_test'])}")
    return out


def build_model(plan: Plan, backbone, seed: int = 0):
    from ..models import PromptedCLIP

    return PromptedCLIP(backbone, seed=seed, **dataclasses.asdict(plan.prompt))


def meta_train(args, plan: Plan, backbone, data, run: Run, method: str = "gram", run_dir=None, resume=False):
    from ..data import NWayKShotTasks
    from ..meta import MetaPromptTrainer
    from ..regulator import GradientRegulator

    model = build_model(plan, backbone, args.seed)
    d = plan.data
    source = NWayKShotTasks(data["base_train"], d.n_way, d.k_support, d.k_query)
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


def tune_and_eval(args, plan: Plan, backbone, data, run: Run, init=None, label: str = "coop"):
    from ..finetune import evaluate_base_new, tune
    from ..prompts import PromptInit

    model = build_model(plan, backbone, args.seed)
    evaluate_fn = lambda: evaluate_base_new(model, data["base_test"], data["new_test"])  # noqa: E731
    hist = tune(model, data["base_train"], plan.tune, init=init, evaluate_fn=evaluate_fn, progress=not args.quiet,
                log=lambda r: run.log(f"{label} epoch {r['epoch']}: loss {r['train_loss']:.3f} base {r['base']:.3f} "
                                      f"new {r['new']:.3f} H {r['H']:.3f}"))
    final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
    prompt = PromptInit.from_module(model, **model.config(), tuned_from=label)
    return model, hist, final, prompt


def _check_init_fits(plan: Plan, backbone, seed: int) -> None:
    """Names, shapes and backbone of the init against the model it will go into, before data is read."""
    if plan.init is None:
        return
    from ..prompts import PromptInitError, prompt_parameters

    problems = plan.init.check_against(prompt_parameters(build_model(plan, backbone, seed)), backbone=backbone.name)
    if problems:
        raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))


def _start(args):
    """Check everything, build the backbone, list the data; the run folder is not touched yet."""
    import torch

    p = plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone)
    p.prompt.check_backbone(backbone)
    _check_init_fits(p, backbone, args.seed)
    ds, unreadable = load_data(args, p, backbone)
    return p, backbone, ds, unreadable


@contextlib.contextmanager
def _command(args):
    """Check everything, then lock and open the run folder and prepare the data: (plan, backbone, data, run)."""
    p, backbone, ds, unreadable = _start(args)
    with _open_run(args) as run:
        yield p, backbone, prepare_data(args, p, ds, backbone, run, unreadable), run


def _open_run(args) -> Run:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "config")}
    return Run(args.out, config, resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False))


def _table(rows: dict[str, dict]) -> str:
    head = f"{'method':<14}{'base':>8}{'new':>8}{'H':>8}{'all':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{100 * m[k]:>8.1f}" for k in ("base", "new", "H", "all")))
    return "\n".join(lines)


def _meta_curve(history: list[dict]) -> list[dict]:
    # a skipped (non-finite) step has no loss: null in metrics.json, which never holds NaN
    return [{"step": r["step"], "meta_loss": None if r["skipped"] else r["meta_loss"]} for r in history]
