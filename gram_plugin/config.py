"""The library's config dataclasses and what they share: one error that lists every problem, small field checks.

``MetaConfig`` (:mod:`gram_plugin.meta`'s run loop), ``TuneConfig`` (:func:`gram_plugin.finetune.tune`)
and ``PromptConfig`` (:class:`gram_plugin.models.PromptedCLIP`) are defined here, in the bottom layer
without torch, so that the command line checks every option before torch is imported; their modules
re-export them under the same names. Each config (these three, ``CHCConfig``, the CLI's
``DataConfig`` ...) checks its own fields in ``__post_init__`` and raises one :class:`ConfigError`
listing all its problems; :func:`build_all` builds several at once and reports the problems of all of
them together, so a command line with three bad numbers gets one message naming the three.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import GramPluginError


class ConfigError(GramPluginError, ValueError):
    """Invalid settings; ``problems`` lists each one."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


def positive_number(name: str, v: Any) -> list[str]:
    """``[]``, or the problem when ``v`` is not a finite number > 0 (``name`` names the field)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return [] if ok else [f"{name} must be a finite number > 0, got {v!r}"]


def integer_at_least(name: str, v: Any, low: int) -> list[str]:
    """``[]``, or the problem when ``v`` is not an integer >= ``low`` (booleans are not integers here)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
    return [] if ok else [f"{name} must be an integer >= {low}, got {v!r}"]


def seed_problems(name: str, v: Any) -> list[str]:
    """A random seed: a whole number torch, numpy and Python all take (``torch.manual_seed`` overflows past 2**64)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
    return [] if ok else [f"{name} must be an integer in [0, 2**63), got {v!r}"]


def one_of(name: str, v: Any, choices: tuple) -> list[str]:
    """``[]``, or the problem when ``v`` is not one of ``choices``."""
    return [] if v in choices else [f"{name} must be one of {list(choices)}, got {v!r}"]


def backbone_problems(spec: Any) -> list[str]:
    """What is wrong with a ``--backbone`` spec (``backbones.build_backbone``'s names) that shows without loading
    it: no spec, ``proxy`` with an argument, ``tiny:SEED`` without a whole number, a weights file that is not there."""
    if not isinstance(spec, str) or not spec:
        return [f"--backbone must be proxy[:DIR], tiny[:SEED] or MODEL:PRETRAINED, got {spec!r}"]
    kind, _, rest = spec.partition(":")
    if kind == "proxy" and rest:
        return [f"--backbone proxy takes no argument (got {spec!r}); a built folder of the earlier proxy is proxy-v1:DIR"]
    if kind == "tiny" and rest:
        try:
            int(rest)
        except ValueError:
            return [f"--backbone tiny:SEED needs a whole-number seed, got {rest!r}"]
    if kind not in ("proxy-v1", "tiny") and os.path.sep in rest and not Path(rest).exists():  # a path, not a tag
        return [f"--backbone {spec}: weights file {rest} does not exist"]
    return []


def raise_problems(what: str, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` for ``what`` listing ``problems``, if there are any."""
    if problems:
        raise ConfigError(what, problems)


def build_all(**factories: Callable[[], Any]) -> dict[str, Any]:
    """Call every factory; if any raise :class:`ConfigError`, raise one listing all their problems."""
    built, problems = {}, []
    for key, make in factories.items():
        try:
            built[key] = make()
        except ConfigError as e:
            problems += e.problems
    raise_problems("options", problems)
    return built


@dataclass
class MetaConfig:
    """Hyper-parameters of :class:`~gram_plugin.meta.MetaPromptTrainer` (defaults follow the MAML+clipping
    paper where it gives one)."""

    inner_lr: float = 0.025 / 6  # alpha: inner-loop step size
    inner_steps: int = 4  # k: inner steps per task
    outer_lr: float = 1e-3  # lambda1: Adam lr of the prompt init theta
    regulator_lr: float = 1e-3  # lambda2: Adam lr of the regulator phi
    meta_batch_size: int = 4  # tasks per outer step
    steps: int = 200  # outer steps
    first_order: bool = False  # FOMAML: no second-order terms (the regulator still learns)
    clip_gamma: float | None = 5.0  # meta-gradient clipping threshold (the MAML+clipping paper's); None = off
    seed: int = 0
    on_nonfinite: str = "raise"  # "raise": stop with the step number; "skip": drop the step and count it
    checkpoint_every: int = 10  # outer steps between checkpoints when run_dir is set (0 = only at the end)
    log_every: int = 1
    track_alignment: bool = False  # log cos(support grad, query grad) at theta, raw and regulated (GRAM Fig. 3b)
    # Memory (second order only; first order keeps no inner graph anyway): True = keep no inner-step
    # graph, the meta-backward recomputes each step (gram_plugin.scale); "auto" = where tasks are batched,
    # keep the inner-step graphs that fit in half the model's weight memory and recompute the rest
    # (gram_plugin.metabatch; same gradients); False = keep every graph.
    checkpoint_inner: bool | str = "auto"
    # Speed: the tasks of a meta-batch through one batched forward per inner step
    # (gram_plugin.metabatch) when the loss function has a ``batched`` form (PromptedCLIP, CoOp mode);
    # same result, but the whole meta-batch's graphs are held at once instead of one task's
    # (bounded by checkpoint_inner="auto").
    batch_tasks: bool = True
    progress: bool = True

    def __post_init__(self):
        problems = []
        for name in ("inner_lr", "outer_lr", "regulator_lr"):
            problems += positive_number(name, getattr(self, name))
        for name in ("inner_steps", "meta_batch_size", "steps", "log_every"):
            problems += integer_at_least(name, getattr(self, name), 1)
        problems += integer_at_least("checkpoint_every", self.checkpoint_every, 0)
        problems += seed_problems("seed", self.seed)
        if self.clip_gamma is not None:
            problems += positive_number("clip_gamma", self.clip_gamma)
        problems += one_of("on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        problems += one_of("checkpoint_inner", self.checkpoint_inner, (False, True, "auto"))
        raise_problems("MetaConfig", problems)


@dataclass
class TuneConfig:
    """Settings of :func:`~gram_plugin.finetune.tune` (defaults: CoOp's optimiser, SGD with momentum 0.9 at
    lr 2e-3, batch 32)."""

    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, as CoOp) or "adam"
    prograd_lambda: float | None = None  # ProGrad projection strength (None = off)
    use_regulator: bool = True  # regulate every step with the init's regulator, when it has one
    seed: int = 0

    def __post_init__(self):
        problems = integer_at_least("epochs", self.epochs, 1) + positive_number("lr", self.lr)
        problems += integer_at_least("batch_size", self.batch_size, 1)
        problems += one_of("optimizer", self.optimizer, ("sgd", "adam"))
        problems += seed_problems("seed", self.seed)
        lam = self.prograd_lambda
        if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0 <= lam <= 1):
            problems.append(f"prograd_lambda must lie in [0, 1] or be None, got {lam!r}")
        raise_problems("TuneConfig", problems)


MODES = ("coop", "vpt", "unigram")
VISUAL_PROMPTS = ("tokens", "pixels")
LAYOUTS = ("padding", "patch")  # pixel prompts (gram_plugin.pixel_prompt): on a border, or on every pixel


@dataclass
class PromptConfig:
    """What prompts a :class:`~gram_plugin.models.PromptedCLIP` learns (CoOp's defaults: 4 context vectors
    from "a photo of a")."""

    mode: str = "coop"  # "coop" (text context), "vpt" (visual prompts) or "unigram" (both)
    n_ctx: int = 4  # text context vectors
    ctx_init: str | None = "a photo of a"  # phrase of n_ctx words, or None for random N(0, 0.02)
    n_vpt: int = 4  # visual prompt tokens per layer
    vpt_deep: bool = False  # one set of visual prompts per image-tower layer
    # "tokens" (VPT) or "pixels" (gram_plugin.pixel_prompt); None: tokens if the tower has them, else pixels
    visual_prompt: str | None = None
    pixel_layout: str = "padding"  # pixel prompt on a border ("padding") or on every pixel ("patch")
    pixel_pad: int | None = None  # border width; None: the paper's 30 px at 224 px, scaled to the input size

    def __post_init__(self):
        problems = one_of("mode", self.mode, MODES)
        if self.visual_prompt is not None:
            problems += one_of("visual_prompt", self.visual_prompt, VISUAL_PROMPTS)
        problems += one_of("pixel_layout", self.pixel_layout, LAYOUTS)
        if self.mode != "vpt":  # the other mode's count is unused (models record it as 0)
            problems += integer_at_least("n_ctx", self.n_ctx, 1)
        if self.mode != "coop" and self.visual_prompt != "pixels":  # a pixel prompt has no tokens (recorded as 0)
            problems += integer_at_least("n_vpt", self.n_vpt, 1)
        if self.ctx_init is not None and not isinstance(self.ctx_init, str):
            problems.append(f"ctx_init must be a phrase or None, got {self.ctx_init!r}")
        elif self.ctx_init and self.mode != "vpt" and isinstance(self.n_ctx, int):
            words = len(self.ctx_init.replace("_", " ").split())
            if words != self.n_ctx:
                problems.append(f"ctx_init {self.ctx_init!r} has {words} words but n_ctx={self.n_ctx} "
                                "(give a phrase of n_ctx words, or 'random')")
        raise_problems("PromptConfig", problems)

    def check_backbone(self, backbone) -> None:
        """Errors that need the backbone: a text prompt longer than its text tower takes (``ConfigError``)."""
        limit = getattr(backbone, "context_length", None)
        if self.mode != "vpt" and limit is not None and self.n_ctx + 4 > limit:
            raise ConfigError("PromptConfig", [
                f"n_ctx={self.n_ctx} is too long for {backbone.name}: a prompt needs n_ctx + 4 tokens "
                f"(start, class name, '.', end) and its text tower takes {limit}, so n_ctx <= {limit - 4}"])
