"""Prompt tuning of a :class:`~gram_plugin.models.PromptedCLIP` and base/new evaluation.

``tune`` runs SGD on the prompt parameters only, optionally starting from a meta-learned
``PromptInit`` and passing every step's gradient through its ``GradientRegulator`` (installed on
the optimiser with ``install_gradient_transform``), optionally with ProGrad against the zero-shot
prompt ``"a photo of a {}."``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import GramPluginError
from .config import TuneConfig  # defined torch-free (the CLI checks it before importing torch); exported here
from .hooks import StepArguments, install_gradient_transform
from .interrupts import stop_after_step
from .prompts import PromptInit, prompt_parameters
from .regulator import GradientRegulator
from .stats import harmonic_mean  # noqa: F401  (part of this module's API since before stats.py)
from .transforms import chain, general_knowledge_gradients, prograd, regulate

ZERO_SHOT_TEMPLATE = "a photo of a {}."


class TuningError(GramPluginError, RuntimeError):
    """Tuning or evaluation produced a non-finite loss, prompt or prediction (nothing is a result)."""


class TuningInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`tune` after the step (or the evaluation) in progress: the model holds the prompt
    learned until then, ``step`` steps into ``epoch`` (``step`` 0: after that epoch's evaluation), and
    ``history`` the records of the epochs completed."""

    def __init__(self, epoch: int, step: int, epochs: int, history: list[dict]):
        self.epoch, self.step, self.epochs, self.history = epoch, step, epochs, history
        where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch}, step {step}"
        super().__init__(f"tuning interrupted {where} of {epochs}")


@torch.no_grad()
def zero_shot_text_features(backbone, classnames: list[str], template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    """Text features of the hand-crafted prompt ``template`` for each class name (underscores read as spaces)."""
    ids = backbone.tokenize([template.format(c.replace("_", " ")) for c in classnames])
    return backbone.encode_text_embeddings(backbone.embed_tokens(ids), ids)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator).tolist()
    for s in range(0, n, batch_size):
        yield perm[s : s + batch_size]


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``model`` over all of ``dataset`` (its own class names)."""
    if len(dataset) == 0:
        raise ValueError(f"cannot evaluate on an empty dataset {dataset.name}")
    bad = [n for n, p in prompt_parameters(model).items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TuningError(f"the prompt holds non-finite values (NaN or Inf) in {bad}: no accuracy to report")
    model.set_classnames(dataset.classnames)
    text = model.text_features()  # once for all batches
    correct = 0
    for s in range(0, len(dataset), batch_size):
        idx = list(range(s, min(s + batch_size, len(dataset))))
        batch = dataset.batch(idx)
        logits = model.logits(batch, text)
        if not bool(torch.isfinite(logits).all()):
            raise TuningError(f"non-finite logits on {dataset.name} (images {idx[0]}..{idx[-1]}): no accuracy to report")
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(dataset)


def evaluate_base_new(model, base_test, new_test, all_test=None) -> dict:
    """Base, new, harmonic mean H (CoOp/CoCoOp base-to-new protocol), and optionally all classes."""
    out = {"base": evaluate(model, base_test), "new": evaluate(model, new_test)}
    out["H"] = harmonic_mean(out["base"], out["new"])
    if all_test is not None:
        out["all"] = evaluate(model, all_test)
    return out


def tune(
    model,
    train,
    config: TuneConfig | None = None,
    init: PromptInit | None = None,
    evaluate_fn: Callable[[], dict] | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    **options,
) -> list[dict]:
    """Prompt-tune ``model`` on the dataset ``train``; return one record per epoch.

    ``config``: a :class:`TuneConfig`, or its fields as keyword ``options`` (``epochs=``, ``lr=``, ...).
    ``init``: a meta-learned init copied into the prompts first; its regulator (if any, and if
    ``use_regulator``) transforms every step's gradient. ``prograd_lambda``: ProGrad projection
    strength against the zero-shot prompt (None = off). ``evaluate_fn()`` is called after every
    epoch and its numbers are added to the record. A non-finite loss or prompt stops tuning with a
    :class:`TuningError` naming the epoch and step. Ctrl-C stops it after the step (or the evaluation) in
    progress with :class:`TuningInterrupted`, the model keeping the prompt learned so far; a second Ctrl-C at once.
    """
    if config is not None and options:
        raise TypeError("pass either config= or its fields as keywords, not both")
    cfg = config if config is not None else TuneConfig(**options)
    from tqdm.auto import tqdm

    if len(train) == 0:
        raise ValueError("training set is empty")
    if init is not None:
        init.apply_to(model, backbone=getattr(model.backbone, "name", None))
    params = prompt_parameters(model)
    if cfg.optimizer == "sgd":  # CoOp's optimiser
        opt = torch.optim.SGD(list(params.values()), lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    transforms = []
    regulator = GradientRegulator.from_init(init) if (init is not None and cfg.use_regulator) else None
    zs_text = None
    if cfg.prograd_lambda is not None:
        if not model.uses_text_prompt:
            raise ValueError("ProGrad needs a text prompt (mode 'coop' or 'unigram')")
        transforms.append(prograd(cfg.prograd_lambda))
        zs_text = F.normalize(zero_shot_text_features(model.backbone, train.classnames).float(), dim=-1)
    if regulator is not None:
        transforms.append(regulate(regulator))
    step_arguments = StepArguments()  # ProGrad's general_grads for the current step
    hook = install_gradient_transform(opt, params, chain(*transforms), step_arguments) if transforms else None
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    model.set_classnames(train.classnames)
    with contextlib.ExitStack() as cleanup:
        if hook is not None:
            cleanup.callback(hook.remove)
        interrupt = cleanup.enter_context(stop_after_step())
        for epoch in tqdm(range(1, cfg.epochs + 1), desc="tune", unit="epoch", disable=not progress):
            total, correct, loss_sum = 0, 0, 0.0
            for step, idx in enumerate(_batches(len(train), cfg.batch_size, gen), start=1):
                batch = train.batch(idx)
                logits = model.logits(batch)
                loss = F.cross_entropy(logits, batch["labels"])
                if not bool(torch.isfinite(loss)):
                    raise TuningError(f"epoch {epoch}, step {step}: non-finite training loss ({float(loss.detach())}); "
                                      "lower the learning rate or check the init")
                if zs_text is not None:
                    # ProGrad's general direction: KL(p_zero-shot || p_prompted) on the same images
                    img = F.normalize(model.image_features(batch).float(), dim=-1)
                    zs = model.backbone.logit_scale.float() * img @ zs_text.t()
                    step_arguments.set(general_grads=general_knowledge_gradients(logits, zs, params, retain_graph=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_arguments.clear()
                bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
                if bad:
                    raise TuningError(f"epoch {epoch}, step {step}: the update made {bad} non-finite; "
                                      "lower the learning rate")
                if interrupt.requested:  # the prompt now is that of a whole step
                    raise TuningInterrupted(epoch, step, cfg.epochs, history)
                n = len(idx)
                total += n
                loss_sum += float(loss.detach()) * n
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            record = {"epoch": epoch, "train_loss": loss_sum / total, "train_acc": correct / total}
            if evaluate_fn is not None:
                record.update(evaluate_fn())
                model.set_classnames(train.classnames)
            history.append(record)
            if log is not None:
                log(record)
            if interrupt.requested:  # asked during the evaluation
                raise TuningInterrupted(epoch, 0, cfg.epochs, history)
    return history
