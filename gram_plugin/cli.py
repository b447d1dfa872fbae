"""``gram-plugin`` command line: meta-train | tune | eval | inspect | demo (+ chc, build-proxy).

Every command writes into one run folder (``--out``): ``config.yaml``, ``log.txt``,
``metrics.json``, artefacts (``init.safetensors``, ``prompt.safetensors``) and ``accuracy.png``;
meta-train also keeps checkpoints in ``meta/`` (``--resume`` continues from them). Options may come
from ``--config file.yaml`` (keys = option names with ``_``); flags given on the command line win.
Defaults come from the config dataclasses (``MetaConfig``, ``TuneConfig``, ``PromptConfig``,
``DataConfig``); ``demo`` alone uses the quicker ``DEMO_SETTINGS``. Every option is checked, and an
existing init file read, before anything is loaded or written; a non-empty run folder is refused
unless ``--resume`` or ``--overwrite`` is given, and a run holds a lock on its folder while it writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .backbones import build_backbone
from .config import ConfigError, integer_at_least
from .finetune import TuneConfig
from .meta import MetaConfig
from .models import PromptConfig
from .paths import inside_run_dir
from .safeio import atomic_write_text, locked_dir


class CLIError(RuntimeError):
    pass


@dataclass
class DataConfig:
    """Which images, how they are split, and the meta-training tasks drawn from them."""

    data: str = "default"  # default | caltech101:ROOT | imagenet:ROOT | folder:ROOT
    test_fraction: float = 0.5  # share of each class held out for testing, in (0, 1)
    shots: int = 0  # images per base class for tuning (0 = all)
    n_way: int = 3  # classes per meta-training task
    k_support: int = 2  # support images per class of a task
    k_query: int = 4  # query images per class of a task
    skip_unreadable: bool = False  # leave out images that cannot be decoded (counted in the log) instead of failing

    def __post_init__(self):
        tf = self.test_fraction
        problems = [] if isinstance(tf, (int, float)) and 0 < tf < 1 else [f"test_fraction must lie in (0, 1), got {tf!r}"]
        problems += integer_at_least("shots", self.shots, 0)
        for name in ("n_way", "k_support", "k_query"):
            problems += integer_at_least(name, getattr(self, name), 1)
        if problems:
            raise ConfigError("DataConfig", problems)


# The demo is a smoke run (about a minute on a laptop CPU): fewer, larger steps than the defaults.
DEMO_SETTINGS = dict(meta_steps=30, inner_lr=0.05, inner_steps=2, outer_lr=0.01, meta_batch_size=2, clip_gamma=5.0,
                     epochs=15, lr=0.01, optimizer="adam", batch_size=16, threads=1)

# flags whose name is not the field's name with dashes
_FLAG_OF = {"steps": "--meta-steps", "prograd_lambda": "--prograd", "use_regulator": "--no-regulator"}
_PROMPT_FIELDS = ("mode", "n_ctx", "n_vpt", "vpt_deep", "visual_prompt", "pixel_layout", "pixel_pad")  # an init file fixes these
RUN_FILES = ("config.yaml", "log.txt", "metrics.json", "init.safetensors", "prompt.safetensors", "accuracy.png", "meta")
_NOT_COMPARED_ON_RESUME = {"quiet", "threads", "resume", "overwrite", "meta_steps", "out"}


def _flag(field: str) -> str:
    return _FLAG_OF.get(field, "--" + field.replace("_", "-"))


def _as_flags(problems: list[str]) -> list[str]:
    out = []
    for p in problems:
        field, _, rest = p.partition(" ")
        out.append(f"{_flag(field)} {rest}" if field.isidentifier() and rest else p)
    return out


# -- run folder --------------------------------------------------------------------------------------
class Run:
    """The run folder of one command, locked while the command writes to it.

    Opened only after every input was checked. ``resume``: continue the run already there (its
    ``config.yaml`` must agree); ``overwrite``: remove the previous run's files first (caches stay).
    """

    def __init__(self, out: str, config: dict, resume: bool = False, overwrite: bool = False):
        self.dir = Path(out)
        self.config = config
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locked_dir(self.dir))
        try:
            self._prepare(resume, overwrite)
        except BaseException:
            self._lock.close()
            raise
        self._log = open(self.path("log.txt"), "a", encoding="utf-8")

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        import yaml

        if overwrite:
            for name in RUN_FILES:
                p = self.dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif not resume and _run_contents(self.dir):  # checked again under the lock
            raise CLIError(_not_empty(self.dir))
        saved = self.dir / "config.yaml"
        if resume and saved.exists():
            before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            # options both know (a run written by an older gram-plugin lacks the newer ones)
            differ = sorted(k for k in set(before) & set(self.config)
                            if k not in _NOT_COMPARED_ON_RESUME and before[k] != self.config[k])
            if differ:
                raise CLIError(f"--resume: options differ from the run's config.yaml in {self.dir}: "
                               + ", ".join(f"{k} {before.get(k)!r} -> {self.config.get(k)!r}" for k in differ))
        atomic_write_text(saved, yaml.safe_dump(self.config, sort_keys=True))

    def path(self, relative: str) -> Path:
        return inside_run_dir(self.dir, relative)

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def write_metrics(self, metrics: dict) -> Path:
        # allow_nan=False: a NaN reaching a result is a bug, never a number in metrics.json
        return atomic_write_text(self.path("metrics.json"), json.dumps(metrics, indent=2, allow_nan=False))

    def plot(self, curves: dict[str, list[float]], name: str = "accuracy.png", title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, ys in curves.items():
            ax.plot(range(1, len(ys) + 1), [100 * y for y in ys], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = self.path(name)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p

    def close(self):
        self._log.close()
        self._lock.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self.log(f"FAILED: {error}")
        self.close()


def _run_contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []


def _not_empty(folder: Path) -> str:
    held = _run_contents(folder)
    return (f"run folder {folder} is not empty (holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}); "
            "pass --resume to continue the run there, --overwrite to replace it, or choose another --out")


def _writable(folder: Path) -> bool:
    """A real probe (permissions, read-only file systems, root included); the probe file deletes itself."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# -- building blocks ---------------------------------------------------------------------------------
def _backbone_problems(spec) -> list[str]:
    if not isinstance(spec, str) or not spec:
        return [f"--backbone must be proxy[:DIR], tiny[:SEED] or MODEL:PRETRAINED, got {spec!r}"]
    kind, _, rest = spec.partition(":")
    if kind == "tiny" and rest and not rest.lstrip("-").isdigit():
        return [f"--backbone tiny:SEED needs a whole-number seed, got {rest!r}"]
    return []


@dataclass
class Plan:
    """Everything a command needs, checked before any data is loaded or anything is written."""

    prompt: PromptConfig
    data: DataConfig
    tune: TuneConfig | None = None
    meta: MetaConfig | None = None
    init: object = None  # PromptInit read from --init / --prompt


def _fields(cls, args, **renamed) -> dict:
    """The dataclass's fields that the command line sets (``renamed``: field -> option name)."""
    out = {}
    for f in dataclasses.fields(cls):
        key = renamed.get(f.name, f.name)
        if hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out


def plan(args) -> Plan:
    """Check every option, the run folder and the init file; one ``CLIError`` lists all problems."""
    problems: list[str] = []
    init = None
    init_path = getattr(args, "init", None) or getattr(args, "prompt", None)
    if init_path:
        from .prompts import PromptInit

        try:
            init = PromptInit.load(init_path)
        except ValueError as e:
            problems.append(str(e))
        else:
            bad = init.nonfinite_names()
            if bad:
                problems.append(f"{init_path} holds non-finite values (NaN or Inf) in {bad}: it is unusable")
            meta = init.metadata
            for key in _PROMPT_FIELDS:
                given = getattr(args, key, None)
                if key in meta and given is not None and given != meta[key]:
                    problems.append(f"{_flag(key)} {given!r} differs from the {key} {meta[key]!r} that {init_path} "
                                    f"was learned with; drop {_flag(key)} or use a matching file")
                elif key in meta:
                    setattr(args, key, meta[key])
    conflicting = bool(problems)
    for key in _PROMPT_FIELDS:  # not given and not fixed by an init: the PromptConfig default
        if getattr(args, key, None) is None:
            setattr(args, key, getattr(PromptConfig, key))
    problems += _backbone_problems(args.backbone)
    problems += _as_flags(integer_at_least("threads", args.threads, 0))
    # an init file replaces the context, so the phrase it would start from does not apply
    ctx_init = None if init is not None or args.ctx_init in (None, "", "random") else args.ctx_init
    factories = {"data": lambda: DataConfig(**_fields(DataConfig, args))}
    if not conflicting:  # with a conflict the prompt settings are a mix of the file's and the flags'
        factories["prompt"] = lambda: PromptConfig(**{**_fields(PromptConfig, args), "ctx_init": ctx_init})
    if hasattr(args, "epochs"):
        factories["tune"] = lambda: TuneConfig(**{**_fields(TuneConfig, args, prograd_lambda="prograd"),
                                                  "use_regulator": not args.no_regulator})
    if hasattr(args, "meta_steps"):
        factories["meta"] = lambda: MetaConfig(**_fields(MetaConfig, args, steps="meta_steps"),
                                               progress=not args.quiet)
    built = {}
    for key, make in factories.items():
        try:
            built[key] = make()
        except ConfigError as e:
            problems += _as_flags(e.problems)
    problems += _folder_problems(args)
    if problems:
        raise CLIError("invalid input:\n  - " + "\n  - ".join(problems))
    return Plan(init=init, **built)


def _folder_problems(args) -> list[str]:
    problems = []
    out = Path(args.out)
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    if resume and overwrite:
        problems.append("--resume and --overwrite exclude each other")
    base = _nearest_existing(out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file, not a folder")
    elif not base.is_dir():
        problems.append(f"--out {out} cannot be created: {base} is a file")
    elif not _writable(base):
        problems.append(f"--out {out} is not writable (cannot create files in {base})")
    elif resume and not (out / "config.yaml").is_file():
        problems.append(f"--resume: {out} holds no run to continue (no config.yaml)")
    elif not resume and not overwrite and _run_contents(out):
        problems.append(_not_empty(out))
    cache = getattr(args, "cache_dir", None)
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        problems.append(f"--cache-dir {cache} is a file, not a folder")
    return problems


def load_data(args, plan: Plan, backbone) -> tuple[object, list[str]]:
    """The dataset (listed, not yet encoded), checked for base-to-new use; (dataset, unreadable paths)."""
    from .data import load_dataset

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
    from .cache import FeatureCache
    from .data import few_shot, split_train_test, subsample_classes

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
    from .models import PromptedCLIP

    return PromptedCLIP(backbone, seed=seed, **dataclasses.asdict(plan.prompt))


def meta_train(args, plan: Plan, backbone, data, run: Run, method: str = "gram", run_dir=None, resume=False):
    from .data import NWayKShotTasks
    from .meta import MetaPromptTrainer
    from .regulator import GradientRegulator

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
    from .finetune import evaluate_base_new, tune
    from .prompts import PromptInit

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
    from .prompts import PromptInitError, prompt_parameters

    problems = plan.init.check_against(prompt_parameters(build_model(plan, backbone, seed)), backbone=backbone.name)
    if problems:
        raise PromptInitError("init does not fit the model:\n  - " + "\n  - ".join(problems))


# -- commands ----------------------------------------------------------------------------------------
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


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    with _command(args) as (p, backbone, data, run):
        from .finetune import evaluate_base_new

        # the handcrafted prompt ("a photo of a {class}."), untuned: what tuning should not lose on new classes
        zero_shot = evaluate_base_new(build_model(p, backbone, args.seed), data["base_test"], data["new_test"],
                                      data["all_test"])
        init, meta_hist = meta_train(args, p, backbone, data, run, method="gram")
        _, gram_hist, gram_final, gram_prompt = tune_and_eval(args, p, backbone, data, run, init=init, label="gram")
        _, coop_hist, coop_final, _ = tune_and_eval(args, p, backbone, data, run, init=None, label="coop")
        init.save(run.path("init.safetensors"), overwrite=True)
        gram_prompt.save(run.path("prompt.safetensors"), overwrite=True)
        table = _table({"zero-shot": zero_shot, "CoOp": coop_final, "CoOp+GRAM": gram_final})
        print(table)
        run.log("results (accuracy %, held-out images):\n" + table)
        metrics = {"final": {"zero-shot": zero_shot, "coop": coop_final, "coop+gram": gram_final},
                   "per_epoch": {"coop": coop_hist, "coop+gram": gram_hist},
                   "meta_train": _meta_curve(meta_hist),
                   "backbone": backbone.name, "data": p.data.data, "seconds": time.perf_counter() - t0}
        run.write_metrics(metrics)
        run.plot({"CoOp base": [r["base"] for r in coop_hist], "CoOp new": [r["new"] for r in coop_hist],
                  "CoOp+GRAM base": [r["base"] for r in gram_hist], "CoOp+GRAM new": [r["new"] for r in gram_hist]},
                 title=f"base-to-new on {p.data.data} ({backbone.name})")
        run.log(f"wrote {run.path('metrics.json')} and {run.path('accuracy.png')} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_meta_train(args) -> int:
    with _command(args) as (p, backbone, data, run):
        init, hist = meta_train(args, p, backbone, data, run, method=args.method, run_dir=run.path("meta"),
                                resume=args.resume)
        path = init.save(run.path("init.safetensors"), overwrite=True)
        run.write_metrics({"meta_train": _meta_curve(hist),
                           "meta_steps": init.metadata["meta_steps"], "skipped_steps": init.metadata["skipped_steps"]})
        run.log(f"wrote {path}")
    return 0


def cmd_tune(args) -> int:
    with _command(args) as (p, backbone, data, run):
        _, hist, final, prompt = tune_and_eval(args, p, backbone, data, run, init=p.init,
                                               label="gram" if p.init else "coop")
        prompt.save(run.path("prompt.safetensors"), overwrite=True)
        run.write_metrics({"final": final, "per_epoch": hist})
        run.plot({"base": [r["base"] for r in hist], "new": [r["new"] for r in hist]}, title="tune")
    print(_table({"tuned": final}))
    return 0


def cmd_eval(args) -> int:
    from .finetune import evaluate_base_new

    with _command(args) as (p, backbone, data, run):
        model = build_model(p, backbone, args.seed)
        if p.init is not None:
            p.init.apply_to(model, backbone=backbone.name, strict=True)
        final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
        run.write_metrics({"final": final})
    print(_table({"eval": final}))
    return 0


def cmd_inspect(args) -> int:
    from .prompts import PromptInit

    init = PromptInit.load(args.path)
    print(json.dumps(init.describe(), indent=2, default=str))
    return 0


def _dispatch(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(f"gram_plugin.{module}")
    except ImportError as e:
        raise CLIError(f"gram_plugin.{module} is not available ({e})") from None
    fn = getattr(mod, "cli_main", None)
    if fn is None:
        raise CLIError(f"gram_plugin.{module} has no cli_main(argv)")
    return int(fn(argv) or 0)


# -- parser ------------------------------------------------------------------------------------------
def _default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _common(p: argparse.ArgumentParser) -> None:
    d = lambda name: _default(DataConfig, name)  # noqa: E731
    p.add_argument("--config", help="yaml file with option values (command-line flags win)")
    p.add_argument("--out", required=True, help="run folder (must be empty unless --overwrite / --resume)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (caches are kept)")
    p.add_argument("--backbone", default="proxy",
                   help="proxy (the default: offline ProxyCLIP v2, ImageNet EfficientNet-Lite0 + ConSE into "
                        "MiniLM), proxy-v1[:DIR] (the earlier proxy), tiny[:SEED] (random tiny CLIP), or open_clip "
                        "MODEL:PRETRAINED (tag or local weights file); see backbones.build_backbone")
    p.add_argument("--data", default=d("data"), help="default | caltech101:ROOT | imagenet:ROOT | folder:ROOT")
    p.add_argument("--skip-unreadable", dest="skip_unreadable", action="store_true",
                   help="leave out images that cannot be decoded (the log says how many and which)")
    # None: from the init file when one is given, else PromptConfig's default
    p.add_argument("--mode", default=None, choices=["coop", "vpt", "unigram"],
                   help=f"default {PromptConfig.mode} (or the init's)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=None, help=f"default {PromptConfig.n_ctx} (or the init's)")
    p.add_argument("--ctx-init", dest="ctx_init", default=PromptConfig.ctx_init, help="phrase, or 'random'")
    p.add_argument("--n-vpt", dest="n_vpt", type=int, default=None, help=f"default {PromptConfig.n_vpt} (or the init's)")
    p.add_argument("--vpt-deep", dest="vpt_deep", action="store_const", const=True, default=None)
    p.add_argument("--shots", type=int, default=d("shots"), help="images per base class for tuning (0 = all)")
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=d("test_fraction"))
    p.add_argument("--seed", type=int, default=_default(TuneConfig, "seed"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cache-dir", dest="cache_dir", default=None)
    p.add_argument("--no-cache", dest="no_cache", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _tuning(p: argparse.ArgumentParser) -> None:
    t = lambda name: _default(TuneConfig, name)  # noqa: E731
    p.add_argument("--epochs", type=int, default=t("epochs"))
    p.add_argument("--lr", type=float, default=t("lr"))
    p.add_argument("--optimizer", default=t("optimizer"), choices=["adam", "sgd"])
    p.add_argument("--batch-size", dest="batch_size", type=int, default=t("batch_size"))
    p.add_argument("--no-regulator", dest="no_regulator", action="store_true")


def _meta(p: argparse.ArgumentParser) -> None:
    m = lambda name: _default(MetaConfig, name)  # noqa: E731
    d = lambda name: _default(DataConfig, name)  # noqa: E731
    p.add_argument("--method", default="gram", choices=["gram", "maml"])
    p.add_argument("--meta-steps", dest="meta_steps", type=int, default=m("steps"))
    p.add_argument("--n-way", dest="n_way", type=int, default=d("n_way"))
    p.add_argument("--k-support", dest="k_support", type=int, default=d("k_support"))
    p.add_argument("--k-query", dest="k_query", type=int, default=d("k_query"))
    p.add_argument("--inner-lr", dest="inner_lr", type=float, default=m("inner_lr"))
    p.add_argument("--inner-steps", dest="inner_steps", type=int, default=m("inner_steps"))
    p.add_argument("--outer-lr", dest="outer_lr", type=float, default=m("outer_lr"))
    p.add_argument("--regulator-lr", dest="regulator_lr", type=float, default=m("regulator_lr"))
    p.add_argument("--meta-batch-size", dest="meta_batch_size", type=int, default=m("meta_batch_size"))
    p.add_argument("--first-order", dest="first_order", action="store_true")
    p.add_argument("--clip-gamma", dest="clip_gamma", type=float, default=m("clip_gamma"),
                   help="meta-gradient clipping threshold (off unless given; the MAML+clipping paper uses 5)")
    p.add_argument("--on-nonfinite", dest="on_nonfinite", default=m("on_nonfinite"), choices=["raise", "skip"])
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=m("checkpoint_every"),
                   help="outer steps between checkpoints in OUT/meta (0 = only at the end)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gram-plugin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="meta-train GRAM on base classes, tune, compare with CoOp on base/new/H")
    _common(p)
    _tuning(p)
    _meta(p)
    p.set_defaults(func=cmd_demo, **DEMO_SETTINGS)
    p = sub.add_parser("meta-train", help="meta-learn a prompt init (+ regulator) -> init.safetensors; with "
                       "--dassl-config: through your own Dassl trainer (gram-plugin meta-train --dassl-config X -h)")
    _common(p)
    _meta(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_meta_train)
    p = sub.add_parser("tune", help="prompt-tune on base classes (optionally from an init), evaluate base/new/H")
    _common(p)
    _tuning(p)
    p.add_argument("--init", default=None, help="init.safetensors from meta-train")
    p.add_argument("--prograd", type=float, default=_default(TuneConfig, "prograd_lambda"),
                   help="ProGrad lambda in [0, 1] (off unless given)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("eval", help="evaluate a prompt (prompt.safetensors) on base/new/all")
    _common(p)
    p.add_argument("--prompt", default=None, help="prompt.safetensors (none = the initial prompt)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("inspect", help="print what an init / prompt file holds")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)
    return parser


def _read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {p} {'is a folder, not a file' if p.is_dir() else 'does not exist'}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CLIError(f"--config {p} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:  # malformed, or a tag such as !!python/object that safe_load refuses
        raise CLIError(f"--config {p} is not plain YAML (option: value lines): {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise CLIError(f"--config {p} must be a mapping of option: value, got {type(cfg).__name__}")
    return cfg


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        cfg = _read_yaml(cfg_path)
        subparsers = parser._subparsers._group_actions[0].choices
        # one yaml may serve the whole pipeline: options of other sub-commands are ignored, typos are not
        actions = {a.dest: a for sp in subparsers.values() for a in sp._actions}
        cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
        unknown = [k for k in cfg if k not in actions]
        if unknown:
            raise CLIError(f"config {cfg_path}: unknown options {unknown}")
        for k, v in cfg.items():  # "1e-3" is a string to YAML 1.1: convert as the flag would
            kind = actions[k].type
            if isinstance(v, str) and kind in (int, float):
                try:
                    cfg[k] = kind(v)
                except ValueError:
                    raise CLIError(f"config {cfg_path}: {k} must be a number, got {v!r}") from None
        known = set(vars(args))
        subparsers[args.command].set_defaults(**{k: v for k, v in cfg.items() if k in known})
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "meta-train" and any(a.split("=")[0] == "--dassl-config" for a in argv[1:]):
            return _dispatch("adapters.meta_command", argv[1:])  # through the user's own Dassl trainer
        if argv and argv[0] == "chc":
            return _dispatch("chc", argv[1:])
        if argv and argv[0] == "build-proxy":
            return _dispatch("proxy_build", argv[1:])
        parser = build_parser()
        args = _apply_yaml(parser, argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that installs it
        from .extras import missing_extra_message

        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"gram-plugin: error: {message}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, RuntimeError, OSError) as e:
        print(f"gram-plugin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
