"""What the commands share: their error, the settings the command line adds to the library's configs,
flag names, and the flag groups every command's parser is built from.

The defaults have one home each: the library's config dataclasses (``MetaConfig``, ``TuneConfig``,
``PromptConfig``) and the three below (``DataConfig``: the standalone path's images; ``TaskConfig``: the
meta-training tasks, both paths; ``DasslConfig``: the user's Dassl trainer). The parser reads them
from there; ``DEMO_SETTINGS`` are the demo's quicker values.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import MetaConfig, PromptConfig, TuneConfig, integer_at_least, one_of, raise_problems
from ..errors import GramPluginError


class CLIError(GramPluginError, RuntimeError):
    """The command cannot run as asked (an option, a file, a folder, a missing dependency)."""


@dataclass
class DataConfig:
    """Which images the standalone path uses and how they are split (``--data`` ...)."""

    data: str = "default"  # default | caltech101:ROOT | imagenet:ROOT | folder:ROOT
    test_fraction: float = 0.5  # share of each class held out for testing, in (0, 1)
    # images per base class that tuning trains on and meta-training draws its tasks from; a class with
    # fewer keeps all of them (Dassl's few-shot rule); 0 = every image. The few-shot protocol's 16.
    # In the Dassl path: DATASET.NUM_SHOTS.
    shots: int = 16
    skip_unreadable: bool = False  # leave out images that cannot be decoded (counted in the log) instead of failing

    def __post_init__(self):
        tf = self.test_fraction
        problems = [] if isinstance(tf, (int, float)) and 0 < tf < 1 else [f"test_fraction must lie in (0, 1), got {tf!r}"]
        problems += integer_at_least("shots", self.shots, 0)
        raise_problems("DataConfig", problems)


TASK_KINDS = ("n-way", "per-dataset", "chc:CORPUS")
CHC_PREFIX = "chc:"


@dataclass
class TaskConfig:
    """The meta-training tasks, drawn from the base classes' ``shots`` images (both paths).

    The defaults are the usual 5-way 5-shot tasks (and MAML + clipping's K = 5 support images), with
    the largest query the embedded default data allows: its classes keep 12 training images each
    (24 images, half held out for testing), so ``k_support + k_query`` = 12 and
    ``gram-plugin meta-train --out RUN`` runs on it as it is; with Dassl's 16 shots a task uses 12 of
    a class's 16 images, drawn anew for every task. The default data has 5 base classes, so there
    every 5-way task holds all five (tasks differ in their images only).
    """

    # n-way: n_way classes per task | per-dataset: all base classes (MAML + clipping) | chc:CORPUS: GRAM's
    # tasks from an image-caption corpus (n_way CHC topics, k_support images from ONE visual domain of each,
    # k_query from all its domains; gram_plugin.chc)
    tasks: str = "n-way"
    n_way: int = 5  # classes per n-way task
    k_support: int = 5  # support images per class
    k_query: int = 7  # query images per class (n-way; per-dataset tasks query the other shots - k_support)

    def __post_init__(self):
        if isinstance(self.tasks, str) and self.tasks.startswith(CHC_PREFIX):
            problems = [] if self.corpus else ["tasks chc:CORPUS needs the corpus: a folder or its captions file"]
        else:
            problems = one_of("tasks", self.tasks, TASK_KINDS)
        problems += integer_at_least("n_way", self.n_way, 2)
        problems += integer_at_least("k_support", self.k_support, 1)
        problems += integer_at_least("k_query", self.k_query, 1)
        raise_problems("TaskConfig", problems)

    @property
    def corpus(self) -> str | None:
        """The corpus of ``chc:CORPUS`` tasks (None for the tasks from labelled base classes)."""
        if isinstance(self.tasks, str) and self.tasks.startswith(CHC_PREFIX):
            return self.tasks[len(CHC_PREFIX):]
        return None

    def pool_problems(self, shots: int) -> list[str]:
        """What the tasks cannot draw from ``shots`` images per class (0 = every image: not known yet)."""
        if self.corpus is not None:  # topics, not classes: checked once the hierarchy is built
            return []
        if self.tasks == "per-dataset":
            if not shots or self.k_support >= shots:
                return [f"--tasks per-dataset needs --k-support {self.k_support} < --shots (the rest of each class's "
                        f"--shots images are the query), got --shots {shots}"]
        elif shots and self.k_support + self.k_query > shots:
            return [f"--k-support {self.k_support} + --k-query {self.k_query} images per class exceed --shots {shots}"]
        return []


@dataclass
class DasslConfig:
    """Meta-training through the user's own Dassl trainer (``--dassl-config`` ...); checked without importing it."""

    dassl_config: str  # the trainer's yaml (as train.py --config-file)
    dataset_config: str | None = None  # the dataset's yaml (as train.py --dataset-config-file)
    trainer: str | None = None  # the trainer's registered name (TRAINER.NAME)
    root: str | None = None  # DATASET.ROOT
    fork: str = "."  # the fork's root: its train.py (extend_cfg, dataset and trainer imports)
    image_cache: bool = True  # decode every task image once and keep it as uint8
    clip_weights: str | None = None  # GRAM.CLIP_WEIGHTS: the CLIP file load_clip_to_cpu reads, or "random"
    opts: list = field(default_factory=list)  # trailing KEY VALUE config options, as train.py takes them

    def __post_init__(self):
        problems = []
        for flag, f in (("--dassl-config", self.dassl_config), ("--dataset-config", self.dataset_config)):
            if not f:
                problems.append(f"--dassl-config needs {flag} FILE")
            elif not Path(f).is_file():
                problems.append(f"{flag} {f} {'is a folder, not a file' if Path(f).is_dir() else 'does not exist'}")
        if not self.trainer:
            problems.append("--dassl-config needs --trainer NAME (the trainer's registered name, e.g. CoOp)")
        if not (Path(self.fork) / "train.py").is_file():
            problems.append(f"--fork {self.fork}: no train.py there (run from the fork's root or pass --fork)")
        if self.root is not None and not Path(self.root).is_dir():
            problems.append(f"--root {self.root} is not a folder")
        if self.clip_weights not in (None, "random") and not Path(self.clip_weights).expanduser().is_file():
            problems.append(f"--clip-weights {self.clip_weights} "
                            f"{'is a folder, not a file' if Path(self.clip_weights).is_dir() else 'does not exist'} "
                            "(a CLIP checkpoint: OpenAI's .pt as downloaded, or a CLIP state dict; or 'random')")
        flags = [o for o in self.opts if str(o).startswith("--")]
        if flags:
            problems.append(f"{flags[0]} comes after the trailing KEY VALUE config options: put the flags first")
        elif len(self.opts) % 2:
            problems.append(f"config options come in KEY VALUE pairs, got {self.opts}")
        raise_problems("DasslConfig", problems)


# The demo is a smoke run (about a minute on a laptop CPU): fewer, larger steps and smaller tasks than the
# defaults (3 of the default data's 5 base classes per task, so tasks differ in their classes).
DEMO_SETTINGS = dict(meta_steps=30, inner_lr=0.05, inner_steps=2, outer_lr=0.01, meta_batch_size=2, clip_gamma=5.0,
                     n_way=3, k_support=2, k_query=4, epochs=15, lr=0.01, optimizer="adam", batch_size=16, threads=1)

DEFAULT_BACKBONE = "proxy"
# flags whose name is not the field's name with dashes
_FLAG_OF = {"steps": "--meta-steps", "prograd_lambda": "--prograd", "use_regulator": "--no-regulator",
            "image_cache": "--no-image-cache"}
_PROMPT_FIELDS = ("mode", "n_ctx", "n_vpt", "vpt_deep", "visual_prompt", "pixel_layout", "pixel_pad")  # an init file fixes these
# the two ways to meta-train: each one's flags are refused on the other (None = not given)
STANDALONE_ONLY = ("backbone", "data", "test_fraction", "skip_unreadable", "mode", "n_ctx", "ctx_init", "n_vpt",
                   "vpt_deep", "cache_dir", "no_cache")
DASSL_ONLY = ("dataset_config", "trainer", "root", "fork", "no_image_cache", "clip_weights", "opts")
# flags of the earlier meta-train commands -> what replaced them
RENAMED = {
    "--steps": "--steps is now --meta-steps",
    "--meta-batch": "--meta-batch is now --meta-batch-size",
    "--run-dir": "--run-dir is gone: checkpoints live in OUT/meta (--out names the run folder)",
    "--no-progress": "--no-progress is now --quiet",
    "--no-regulator": "meta-train --no-regulator is now --method maml",
    "--regulator": "--regulator is now --method gram (the default)",
}


def flag(field_name: str) -> str:
    """The command-line flag of a config field (``meta_batch_size`` -> ``--meta-batch-size``)."""
    return _FLAG_OF.get(field_name, "--" + field_name.replace("_", "-"))


def as_flags(problems: list[str]) -> list[str]:
    """Config problems (``"n_way must be ..."``) in the flags' words (``"--n-way must be ..."``)."""
    out = []
    for p in problems:
        name, _, rest = p.partition(" ")
        out.append(f"{flag(name)} {rest}" if name.isidentifier() and rest else p)
    return out


def default(cls, name: str):
    """The default of a config dataclass's field: the one home the parser reads it from."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


class _Renamed(argparse.Action):
    """A flag of an earlier version: refused with one message naming its successor."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise CLIError(RENAMED[option_string])


def add_renamed(p: argparse.ArgumentParser, *names: str) -> None:
    """Accept the earlier flags ``names`` only to refuse them with the name of their successor (``RENAMED``)."""
    for name in names:
        p.add_argument(name, dest=f"_renamed_{name.strip('-').replace('-', '_')}", action=_Renamed)


def add_run_folder(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--out`` (the run folder) and ``--overwrite``."""
    p.add_argument("--config", help="yaml file with option values (command-line flags win)")
    p.add_argument("--out", required=True, help="run folder (must be empty unless --overwrite / --resume)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (caches are kept)")


def add_standalone(p: argparse.ArgumentParser) -> None:
    """The backbone, data and prompts of the standalone path (None = not given: the config's default)."""
    d = lambda name: default(DataConfig, name)  # noqa: E731
    p.add_argument("--backbone", default=None,
                   help=f"{DEFAULT_BACKBONE} (the default: offline ProxyCLIP v2, ImageNet EfficientNet-Lite0 + ConSE "
                        "into MiniLM), proxy-v1[:DIR] (the earlier proxy), tiny[:SEED] (random tiny CLIP), or open_clip "
                        "MODEL:PRETRAINED (tag or local weights file); see backbones.build_backbone")
    p.add_argument("--data", default=None, help=f"default | caltech101:ROOT | imagenet:ROOT | folder:ROOT "
                                                f"(default {d('data')})")
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=None,
                   help=f"share of each class held out for testing (default {d('test_fraction')})")
    p.add_argument("--skip-unreadable", dest="skip_unreadable", action="store_const", const=True, default=None,
                   help="leave out images that cannot be decoded (the log says how many and which)")
    # from the init file when one is given, else PromptConfig's default
    p.add_argument("--mode", default=None, choices=["coop", "vpt", "unigram"],
                   help=f"default {PromptConfig.mode} (or the init's)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=None, help=f"default {PromptConfig.n_ctx} (or the init's)")
    p.add_argument("--ctx-init", dest="ctx_init", default=None,
                   help=f"phrase, or 'random' (default {PromptConfig.ctx_init!r})")
    p.add_argument("--n-vpt", dest="n_vpt", type=int, default=None, help=f"default {PromptConfig.n_vpt} (or the init's)")
    p.add_argument("--vpt-deep", dest="vpt_deep", action="store_const", const=True, default=None)
    p.add_argument("--cache-dir", dest="cache_dir", default=None)
    p.add_argument("--no-cache", dest="no_cache", action="store_const", const=True, default=None)


def add_standalone_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command of the standalone path: its sub-parser with the run folder, general and model / data flags."""
    p = sub.add_parser(name, help=help)
    add_run_folder(p)
    add_general(p)
    add_standalone(p.add_argument_group("the standalone model and data"))
    return p


def add_general(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--threads``, ``--quiet``, ``--debug``."""
    p.add_argument("--seed", type=int, default=default(TuneConfig, "seed"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (not only its message)")


def add_shots(p: argparse.ArgumentParser) -> None:
    """``--shots`` (default: ``DataConfig``)."""
    p.add_argument("--shots", type=int, default=default(DataConfig, "shots"),
                   help="images per base class to tune on and draw tasks from (a class with fewer keeps all; "
                        "0 = all; Dassl: DATASET.NUM_SHOTS)")


def add_tuning(p: argparse.ArgumentParser) -> None:
    """The tuning flags (defaults: ``TuneConfig``) in their own group."""
    t = lambda name: default(TuneConfig, name)  # noqa: E731
    g = p.add_argument_group("tuning")
    g.add_argument("--epochs", type=int, default=t("epochs"))
    g.add_argument("--lr", type=float, default=t("lr"))
    g.add_argument("--optimizer", default=t("optimizer"), choices=["adam", "sgd"])
    g.add_argument("--batch-size", dest="batch_size", type=int, default=t("batch_size"))
    g.add_argument("--no-regulator", dest="no_regulator", action="store_true")


def add_tasks(p: argparse.ArgumentParser):
    """The task flags (defaults: TaskConfig) in their own group; returns the group."""
    t = lambda name: default(TaskConfig, name)  # noqa: E731
    g = p.add_argument_group("where the tasks come from")
    g.add_argument("--tasks", default=t("tasks"), metavar="{n-way,per-dataset,chc:CORPUS}",
                   help="n-way: --n-way base classes per task, --k-support + --k-query images each; per-dataset: "
                        "all base classes, --shots images each, --k-support of them support (MAML + clipping); "
                        "chc:CORPUS: GRAM's tasks from an image-caption corpus (a folder with a captions file and "
                        "images/, or the captions file): --n-way CHC topics, --k-support images from ONE visual "
                        "domain of each, --k-query from all its domains; the hierarchy goes into OUT")
    g.add_argument("--n-way", dest="n_way", type=int, default=t("n_way"))
    g.add_argument("--k-support", dest="k_support", type=int, default=t("k_support"))
    g.add_argument("--k-query", dest="k_query", type=int, default=t("k_query"))
    return g


def add_meta(p: argparse.ArgumentParser) -> None:
    """The meta-training flags (defaults: ``MetaConfig``) in their own group."""
    m = lambda name: default(MetaConfig, name)  # noqa: E731
    g = p.add_argument_group("how (defaults: MetaConfig)")
    g.add_argument("--method", default="gram", choices=["gram", "maml"],
                   help="gram: the init and GRAM's gradient regulator; maml: the init alone (MAML + clipping)")
    g.add_argument("--meta-steps", dest="meta_steps", type=int, default=m("steps"), help="outer steps")
    g.add_argument("--meta-batch-size", dest="meta_batch_size", type=int, default=m("meta_batch_size"),
                   help="tasks per outer step")
    g.add_argument("--inner-steps", dest="inner_steps", type=int, default=m("inner_steps"))
    g.add_argument("--inner-lr", dest="inner_lr", type=float, default=m("inner_lr"))
    g.add_argument("--outer-lr", dest="outer_lr", type=float, default=m("outer_lr"))
    g.add_argument("--regulator-lr", dest="regulator_lr", type=float, default=m("regulator_lr"))
    g.add_argument("--first-order", dest="first_order", action="store_true",
                   help="first-order MAML (the regulator still learns)")
    g.add_argument("--clip-gamma", dest="clip_gamma", type=float, default=m("clip_gamma"),
                   help="meta-gradient clipping threshold (MAML + clipping's 5; 0 = off)")
    g.add_argument("--on-nonfinite", dest="on_nonfinite", default=m("on_nonfinite"), choices=["raise", "skip"])
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=m("checkpoint_every"),
                   help="outer steps between checkpoints in OUT/meta (0 = only at the end)")


def add_dassl(p: argparse.ArgumentParser) -> None:
    """The Dassl path of ``meta-train``: the user's trainer and config instead of the standalone model."""
    d = lambda name: default(DasslConfig, name)  # noqa: E731
    g = p.add_argument_group(
        "through your own Dassl trainer (instead of --backbone / --data / --mode ...; run from the fork's root)")
    g.add_argument("--dassl-config", dest="dassl_config", default=None,
                   help="the trainer's yaml (as train.py --config-file)")
    g.add_argument("--dataset-config", dest="dataset_config", default=None,
                   help="the dataset's yaml (as train.py --dataset-config-file)")
    g.add_argument("--trainer", default=None, help="the trainer's registered name (TRAINER.NAME), e.g. CoOp")
    g.add_argument("--root", default=None, help="DATASET.ROOT (as train.py --root)")
    g.add_argument("--fork", default=None, help=f"the fork's root, holding its train.py (default {d('fork')!r})")
    g.add_argument("--no-image-cache", dest="no_image_cache", action="store_const", const=True, default=None,
                   help="decode every task image from disk each time (default: decoded once and kept as uint8, "
                        "3 * INPUT.SIZE^2 bytes per base-class image)")
    g.add_argument("--clip-weights", dest="clip_weights", default=None, metavar="FILE",
                   help="the CLIP checkpoint the trainer's load_clip_to_cpu reads instead of downloading it "
                        "(GRAM.CLIP_WEIGHTS; OpenAI's .pt or a CLIP state dict), or 'random': a seeded random CLIP "
                        "for a smoke run (examples/coop_fork/README.md, 'CLIP weights')")
    g.add_argument("opts", nargs=argparse.REMAINDER, help="more config options, KEY VALUE ... (as train.py)")


# the CHC flags of meta-train (--tasks chc:CORPUS only; None = not given)
CHC_ONLY = ("corpus_images", "skip_missing", "min_cluster_size", "min_samples", "n_domains")


def add_chc_tasks(p: argparse.ArgumentParser) -> None:
    """The flags of ``--tasks chc:CORPUS`` (defaults: ``gram_plugin.chc.CHCConfig``, scaled with the corpus)."""
    from ..chc.scaling import SCALING_HELP

    g = p.add_argument_group("GRAM's corpus tasks (--tasks chc:CORPUS)")
    g.add_argument("--corpus-images", dest="corpus_images", default=None,
                   help="the corpus image folder (default CORPUS/images, else CORPUS)")
    g.add_argument("--skip-missing", dest="skip_missing", action="store_const", const=True, default=None,
                   help="leave out captions whose image file is missing (default: an error)")
    g.add_argument("--min-cluster-size", dest="min_cluster_size", type=int, default=None,
                   help=f"HDBSCAN: the smallest topic in captions; {SCALING_HELP}")
    g.add_argument("--min-samples", dest="min_samples", type=int, default=None,
                   help="HDBSCAN (default: scaled with --min-cluster-size)")
    g.add_argument("--n-domains", dest="n_domains", type=int, default=None,
                   help="visual domains per topic (k-means on the image features; default 3)")
