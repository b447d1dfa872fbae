"""What the commands share: the error they raise, the standalone data settings, flag names, the flag groups."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, integer_at_least
from ..finetune import TuneConfig
from ..meta import MetaConfig
from ..models import PromptConfig


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
