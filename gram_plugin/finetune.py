"""Prompt tuning of a :class:`~gram_plugin.models.PromptedCLIP` and base/new evaluation.

``tune`` runs SGD on the prompt parameters only, optionally starting from a meta-learned
``PromptInit`` and passing every step's gradient through its ``GradientRegulator`` (installed on
the optimiser with ``install_gradient_transform``), optionally with ProGrad against the zero-shot
prompt ``"a photo of a {}."``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .hooks import install_gradient_transform
from .prompts import PromptInit, prompt_parameters
from .regulator import GradientRegulator
from .transforms import chain, prograd, regulate

ZERO_SHOT_TEMPLATE = "a photo of a {}."


@torch.no_grad()
def zero_shot_text_features(backbone, classnames: list[str], template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
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
    model.set_classnames(dataset.classnames)
    text = model.text_features()  # once for all batches
    correct = 0
    for s in range(0, len(dataset), batch_size):
        idx = list(range(s, min(s + batch_size, len(dataset))))
        batch = dataset.batch(idx)
        correct += int((model.logits(batch, text).argmax(-1) == batch["labels"]).sum())
    return correct / len(dataset)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


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
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 32,
    init: PromptInit | None = None,
    use_regulator: bool = True,
    prograd_lambda: float | None = None,
    seed: int = 0,
    evaluate_fn: Callable[[], dict] | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    optimizer: str = "sgd",
) -> list[dict]:
    """Prompt-tune ``model`` on the dataset ``train``; return one record per epoch.

    ``init``: a meta-learned init copied into the prompts first; its regulator (if any, and if
    ``use_regulator``) transforms every step's gradient. ``prograd_lambda``: ProGrad projection
    strength against the zero-shot prompt (None = off). ``optimizer``: ``"sgd"`` (momentum 0.9,
    as CoOp) or ``"adam"``. ``evaluate_fn()`` is called after every
    epoch and its numbers are added to the record.
    """
    from tqdm.auto import tqdm

    if len(train) == 0:
        raise ValueError("training set is empty")
    if init is not None:
        init.apply_to(model, backbone=getattr(model.backbone, "name", None))
    params = prompt_parameters(model)
    if optimizer == "sgd":  # CoOp's optimiser
        opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(list(params.values()), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    transforms = []
    regulator = GradientRegulator.from_init(init) if (init is not None and use_regulator) else None
    zs_text = None
    if prograd_lambda is not None:
        if not model.uses_text_prompt:
            raise ValueError("ProGrad needs a text prompt (mode 'coop' or 'unigram')")
        transforms.append(prograd(prograd_lambda))
        zs_text = F.normalize(zero_shot_text_features(model.backbone, train.classnames).float(), dim=-1)
    if regulator is not None:
        transforms.append(regulate(regulator))
    hook = install_gradient_transform(opt, params, chain(*transforms)) if transforms else None
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.set_classnames(train.classnames)
    try:
        for epoch in tqdm(range(1, epochs + 1), desc="tune", unit="epoch", disable=not progress):
            total, correct, loss_sum = 0, 0, 0.0
            for idx in _batches(len(train), batch_size, gen):
                batch = train.batch(idx)
                logits = model.logits(batch)
                loss = F.cross_entropy(logits, batch["labels"])
                if zs_text is not None:
                    # ProGrad's general direction: KL(p_zero-shot || p_prompted) on the same images
                    img = F.normalize(model.image_features(batch).float(), dim=-1)
                    zs = (model.backbone.logit_scale.float() * img @ zs_text.t()).detach()
                    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs, -1), log_target=True, reduction="batchmean")
                    general = torch.autograd.grad(kl, list(params.values()), retain_graph=True, allow_unused=True)
                    hook.context["general_grads"] = dict(zip(params, general))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
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
    finally:
        if hook is not None:
            hook.remove()
    return history
