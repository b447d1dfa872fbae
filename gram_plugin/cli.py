"""``gram-plugin`` command line: meta-train | tune | eval | inspect | demo (+ chc, build-proxy).

Every command writes into one run folder (``--out``): ``config.yaml``, ``log.txt``,
``metrics.json``, artefacts (``init.safetensors``, ``prompt.safetensors``) and ``accuracy.png``.
Options may come from ``--config file.yaml`` (keys = option names with ``_``); flags given on the
command line win.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .backbones import build_backbone
from .paths import inside_run_dir


class CLIError(RuntimeError):
    pass


# -- run folder --------------------------------------------------------------------------------------
class Run:
    def __init__(self, out: str, config: dict):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._log = open(self.path("log.txt"), "a", encoding="utf-8")
        import yaml

        self.path("config.yaml").write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")

    def path(self, relative: str) -> Path:
        return inside_run_dir(self.dir, relative)

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def write_metrics(self, metrics: dict) -> Path:
        p = self.path("metrics.json")
        p.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        return p

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


# -- building blocks ---------------------------------------------------------------------------------
def prepare_data(args, backbone, run: Run):
    """Base/new train/test splits, with cached features when only text prompts are learned."""
    from .cache import FeatureCache
    from .data import few_shot, load_dataset, split_train_test, subsample_classes

    ds = load_dataset(args.data, backbone.preprocess)
    if args.mode == "coop" and not args.no_cache:
        cache_dir = Path(args.cache_dir) if args.cache_dir else run.path("feature_cache")
        ds = FeatureCache(cache_dir, progress=not args.quiet).attach(backbone, ds)
    train, test = split_train_test(ds, args.test_fraction, args.seed)
    out = {"all_test": test}
    for part in ("base", "new"):
        out[f"{part}_train"] = subsample_classes(train, part)
        out[f"{part}_test"] = subsample_classes(test, part)
    if args.shots:
        out["base_train"] = few_shot(out["base_train"], args.shots, args.seed)
    run.log(f"data {ds.name}: {len(ds)} images, {len(ds.classnames)} classes; base train "
            f"{len(out['base_train'])}, base test {len(out['base_test'])}, new test {len(out['new_test'])}")
    return out


def build_model(args, backbone, metadata: dict | None = None):
    from .models import PromptedCLIP

    meta = metadata or {}
    return PromptedCLIP(
        backbone,
        mode=meta.get("mode", args.mode),
        n_ctx=meta.get("n_ctx", args.n_ctx),
        ctx_init=None if args.ctx_init in (None, "", "random") else args.ctx_init,
        n_vpt=meta.get("n_vpt", args.n_vpt),
        vpt_deep=meta.get("vpt_deep", args.vpt_deep),
        seed=args.seed,
    )


def meta_train(args, backbone, data, run: Run, method: str = "gram"):
    from .data import NWayKShotTasks
    from .meta import MetaConfig, MetaPromptTrainer
    from .regulator import GradientRegulator

    model = build_model(args, backbone)
    source = NWayKShotTasks(data["base_train"], args.n_way, args.k_support, args.k_query)
    cfg = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                     regulator_lr=args.regulator_lr, meta_batch_size=args.meta_batch_size, steps=args.meta_steps,
                     first_order=args.first_order, clip_gamma=args.clip_gamma, seed=args.seed, progress=not args.quiet)
    regulator = GradientRegulator.for_module(model) if method == "gram" else None
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=regulator, config=cfg,
                                metadata=model.config())
    t0 = time.perf_counter()
    init = trainer.fit(source)
    hist = trainer.history
    run.log(f"meta-train ({method}): {cfg.steps} steps in {time.perf_counter() - t0:.1f}s, meta loss "
            f"{hist[0]['meta_loss']:.3f} -> {hist[-1]['meta_loss']:.3f}")
    return init, hist


def tune_and_eval(args, backbone, data, run: Run, init=None, label: str = "coop", prograd_lambda=None):
    from .finetune import evaluate_base_new, tune
    from .prompts import PromptInit

    model = build_model(args, backbone, init.metadata if init is not None else None)
    evaluate_fn = lambda: evaluate_base_new(model, data["base_test"], data["new_test"])  # noqa: E731
    hist = tune(model, data["base_train"], epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=init,
                use_regulator=not args.no_regulator, prograd_lambda=prograd_lambda, seed=args.seed,
                evaluate_fn=evaluate_fn, progress=not args.quiet, optimizer=args.optimizer,
                log=lambda r: run.log(f"{label} epoch {r['epoch']}: loss {r['train_loss']:.3f} base {r['base']:.3f} "
                                      f"new {r['new']:.3f} H {r['H']:.3f}"))
    final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
    prompt = PromptInit.from_module(model, **model.config(), tuned_from=label)
    return model, hist, final, prompt


# -- commands ----------------------------------------------------------------------------------------
def _setup(args) -> Run:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "config")}
    return Run(args.out, config)


def _table(rows: dict[str, dict]) -> str:
    head = f"{'method':<14}{'base':>8}{'new':>8}{'H':>8}{'all':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{100 * m[k]:>8.1f}" for k in ("base", "new", "H", "all")))
    return "\n".join(lines)


def cmd_demo(args) -> int:
    run = _setup(args)
    t0 = time.perf_counter()
    backbone = build_backbone(args.backbone)
    data = prepare_data(args, backbone, run)
    from .finetune import evaluate_base_new

    # the handcrafted prompt ("a photo of a {class}."), untuned: what tuning should not lose on new classes
    zero_shot = evaluate_base_new(build_model(args, backbone), data["base_test"], data["new_test"], data["all_test"])
    init, meta_hist = meta_train(args, backbone, data, run, method="gram")
    init.save(run.path("init.safetensors"), overwrite=True)
    _, gram_hist, gram_final, gram_prompt = tune_and_eval(args, backbone, data, run, init=init, label="gram")
    _, coop_hist, coop_final, _ = tune_and_eval(args, backbone, data, run, init=None, label="coop")
    gram_prompt.save(run.path("prompt.safetensors"), overwrite=True)
    table = _table({"zero-shot": zero_shot, "CoOp": coop_final, "CoOp+GRAM": gram_final})
    print(table)
    run.log("results (accuracy %, held-out images):\n" + table)
    metrics = {"final": {"zero-shot": zero_shot, "coop": coop_final, "coop+gram": gram_final},
               "per_epoch": {"coop": coop_hist, "coop+gram": gram_hist},
               "meta_train": [{k: r[k] for k in ("step", "meta_loss") if k in r} for r in meta_hist],
               "backbone": backbone.name, "data": args.data, "seconds": time.perf_counter() - t0}
    run.write_metrics(metrics)
    run.plot({"CoOp base": [r["base"] for r in coop_hist], "CoOp new": [r["new"] for r in coop_hist],
              "CoOp+GRAM base": [r["base"] for r in gram_hist], "CoOp+GRAM new": [r["new"] for r in gram_hist]},
             title=f"base-to-new on {args.data} ({backbone.name})")
    run.log(f"wrote {run.path('metrics.json')} and {run.path('accuracy.png')} in {time.perf_counter() - t0:.1f}s")
    run.close()
    return 0


def cmd_meta_train(args) -> int:
    run = _setup(args)
    backbone = build_backbone(args.backbone)
    data = prepare_data(args, backbone, run)
    init, hist = meta_train(args, backbone, data, run, method=args.method)
    path = init.save(run.path("init.safetensors"), overwrite=True)
    run.write_metrics({"meta_train": [{k: r[k] for k in ("step", "meta_loss") if k in r} for r in hist]})
    run.log(f"wrote {path}")
    run.close()
    return 0


def _load_init(path):
    from .prompts import PromptInit

    return PromptInit.load(path) if path else None


def cmd_tune(args) -> int:
    run = _setup(args)
    backbone = build_backbone(args.backbone)
    data = prepare_data(args, backbone, run)
    init = _load_init(args.init)
    _, hist, final, prompt = tune_and_eval(args, backbone, data, run, init=init,
                                           label="gram" if init else "coop", prograd_lambda=args.prograd)
    prompt.save(run.path("prompt.safetensors"), overwrite=True)
    run.write_metrics({"final": final, "per_epoch": hist})
    run.plot({"base": [r["base"] for r in hist], "new": [r["new"] for r in hist]}, title="tune")
    print(_table({"tuned": final}))
    run.close()
    return 0


def cmd_eval(args) -> int:
    from .finetune import evaluate_base_new

    run = _setup(args)
    backbone = build_backbone(args.backbone)
    data = prepare_data(args, backbone, run)
    prompt = _load_init(args.prompt)
    model = build_model(args, backbone, prompt.metadata if prompt else None)
    if prompt is not None:
        prompt.apply_to(model, backbone=backbone.name, strict=True)
    final = evaluate_base_new(model, data["base_test"], data["new_test"], data["all_test"])
    run.write_metrics({"final": final})
    print(_table({"eval": final}))
    run.close()
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
def _common(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--config", help="yaml file with option values (command-line flags win)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--backbone", default="proxy",
                   help="proxy (the default: offline ProxyCLIP v2, ImageNet EfficientNet-Lite0 + ConSE into "
                        "MiniLM), proxy-v1[:DIR] (the earlier proxy), tiny[:SEED] (random tiny CLIP), or open_clip "
                        "MODEL:PRETRAINED (tag or local weights file); see backbones.build_backbone")
    p.add_argument("--data", default="default", help="default | caltech101:ROOT | imagenet:ROOT | folder:ROOT")
    p.add_argument("--mode", default="coop", choices=["coop", "vpt", "unigram"])
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=4)
    p.add_argument("--ctx-init", dest="ctx_init", default="a photo of a", help="phrase, or 'random'")
    p.add_argument("--n-vpt", dest="n_vpt", type=int, default=4)
    p.add_argument("--vpt-deep", dest="vpt_deep", action="store_true")
    p.add_argument("--shots", type=int, default=0, help="images per base class for tuning (0 = all)")
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--no-regulator", dest="no_regulator", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1 if demo else 0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cache-dir", dest="cache_dir", default=None)
    p.add_argument("--no-cache", dest="no_cache", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _meta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="gram", choices=["gram", "maml"])
    p.add_argument("--meta-steps", dest="meta_steps", type=int, default=30)
    p.add_argument("--n-way", dest="n_way", type=int, default=3)
    p.add_argument("--k-support", dest="k_support", type=int, default=2)
    p.add_argument("--k-query", dest="k_query", type=int, default=4)
    p.add_argument("--inner-lr", dest="inner_lr", type=float, default=0.05)
    p.add_argument("--inner-steps", dest="inner_steps", type=int, default=2)
    p.add_argument("--outer-lr", dest="outer_lr", type=float, default=0.01)
    # the library's default (MetaConfig.regulator_lr); at 0.01 the regulator fit the meta-training
    # classes in benchmarks/RESULTS.md ("GRAM vs MAML")
    p.add_argument("--regulator-lr", dest="regulator_lr", type=float, default=1e-3)
    p.add_argument("--meta-batch-size", dest="meta_batch_size", type=int, default=2)
    p.add_argument("--first-order", dest="first_order", action="store_true")
    p.add_argument("--clip-gamma", dest="clip_gamma", type=float, default=5.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gram-plugin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="meta-train GRAM on base classes, tune, compare with CoOp on base/new/H")
    _common(p, demo=True)
    _meta(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("meta-train", help="meta-learn a prompt init (+ regulator) -> init.safetensors; with "
                       "--dassl-config: through your own Dassl trainer (gram-plugin meta-train --dassl-config X -h)")
    _common(p)
    _meta(p)
    p.set_defaults(func=cmd_meta_train)
    p = sub.add_parser("tune", help="prompt-tune on base classes (optionally from an init), evaluate base/new/H")
    _common(p)
    p.add_argument("--init", default=None, help="init.safetensors from meta-train")
    p.add_argument("--prograd", type=float, default=None, help="ProGrad lambda (off unless given)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("eval", help="evaluate a prompt (prompt.safetensors) on base/new/all")
    _common(p)
    p.add_argument("--prompt", default=None, help="prompt.safetensors (none = the initial prompt)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("inspect", help="print what an init / prompt file holds")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)
    return parser


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        import yaml

        cfg = yaml.safe_load(Path(cfg_path).read_text(encoding="utf-8")) or {}
        if not isinstance(cfg, dict):
            raise CLIError(f"config {cfg_path} must be a mapping of option: value")
        subparsers = parser._subparsers._group_actions[0].choices
        # one yaml may serve the whole pipeline: options of other sub-commands are ignored, typos are not
        anywhere = {a.dest for sp in subparsers.values() for a in sp._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = [k for k in cfg if k not in anywhere]
        if unknown:
            raise CLIError(f"config {cfg_path}: unknown options {unknown}")
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
            return _dispatch("proxy", argv[1:])
        parser = build_parser()
        args = _apply_yaml(parser, argv)
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"gram-plugin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
