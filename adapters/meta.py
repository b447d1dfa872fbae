"""Meta-training *through* a Dassl trainer: MP-CoOp / MP-CoCoOp / MP-PromptSRC, GRAM-VPT, UNIGRAM, ...

``meta_train(trainer, task_source, config)`` meta-learns every learnable tensor of the trainer's method
(the adapter's :meth:`prompt_parameters`: CoOp's ``ctx``, CoCoOp's ``ctx`` + Meta-Net, VPT's per-layer
tokens, MaPLe's ``ctx`` / ``proj`` / compound prompts and projections, IVLP / PromptSRC's text and
visual prompts) with :class:`gram_plugin.meta.MetaPromptTrainer` (MAML, + meta-gradient clipping with
``clip_gamma``, + GRAM's regulator with ``regulator=True``). Joint text + visual prompts (IVLP /
PromptSRC) with one regulator is UNIGRAM's setting.

Tasks have their own class sets (a standard CLIP batch: ``images``, ``labels``, ``classnames``). The
trainer's model holds class-dependent state built once for the dataset's classes -- the token
prefix/suffix buffers and tokenized prompts of the prompt learner, VPT's and PromptSRC's fixed text
embeddings, KgCoOp's hand-crafted text features. :class:`ClassBuffers` has the adapter rebuild that
state for each task's classes the way the trainer's own ``__init__`` does
(:meth:`DasslAdapter.build_class_buffers`: same prompt text, same frozen token embedding, same
templates), while the
learnable tensors are shared across tasks; the trainer's own state is restored afterwards. The
rebuild is checked once against the trainer's buffers for its own classes, so a wrong
``clip_model`` / ``tokenize`` fails loudly instead of training on wrong prompts.

Forward passes run through the trainer's own model code (``torch.func.functional_call`` with the
fast weights), so whatever the method computes -- MaPLe's coupling functions, PromptSRC's frozen
zero-shot encoder -- is what is meta-learned. The loss is the one the trainer optimises, as its
adapter states it (:meth:`DasslAdapter.method_loss`: cross-entropy of the logits; PromptSRC's and
KgCoOp's own regularising terms in their files).

The exported :class:`PromptInit` is keyed by the trainer's parameter names, so the same trainer
(any class split, any precision) loads it with the three-line wrap::

    init = meta_train(trainer, tasks, MetaConfig(...), clip_model=clip, tokenize=clip_tokenize, regulator=True)
    init.save("init.safetensors")
    # later, in train.py:  wrap(build_trainer(cfg), init="init.safetensors")

Meta-train on a float32 trainer (``PREC fp32``): second-order gradients in fp16 are not usable.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch

from gram_plugin.meta import MetaConfig, MetaPromptTrainer, module_loss
from gram_plugin.prompts import PromptInit
from gram_plugin.regulator import GradientRegulator

from .base import AdapterError, DasslAdapter, adapter_for

__all__ = ["meta_train", "ClassBuffers"]


def _trainer_classnames(trainer) -> Optional[list]:
    names = getattr(trainer, "classnames", None)
    if names is None:
        try:
            names = trainer.dm.dataset.classnames
        except AttributeError:
            return None
    return list(names)


class ClassBuffers:
    """Rebuild a trainer's class-dependent state for another class set (``use(classnames)``).

    What that state is and how it is built is the adapter's
    (:meth:`DasslAdapter.build_class_buffers`); this class caches it per class set, swaps it in and
    restores the trainer's own, and checks once that the rebuild reproduces the trainer's buffers
    for its own classes, so a wrong ``clip_model`` / ``tokenize`` fails loudly instead of training
    on wrong prompts.

    Args:
        adapter: the trainer's adapter.
        clip_model: a frozen, prompt-free CLIP with the trainer's pretrained weights (``token_embedding``
            and ``encode_text``), e.g. the repository's ``load_clip_to_cpu(cfg)`` for CoOp/CoCoOp or a
            second plain CLIP for the VPT family (their CLIP's text tower is prompted).
        tokenize: the tokenizer the trainer used (``clip.tokenize`` upstream).
        templates: text templates for adapters whose fixed embeddings average over templates
            (PromptSRC; default: the trainer module's own).
    """

    def __init__(self, adapter: DasslAdapter, clip_model, tokenize: Callable, templates: Optional[Sequence[str]] = None):
        adapter.check_meta_trainable()
        self.adapter, self.clip_model, self.tokenize = adapter, clip_model, tokenize
        if templates is not None:
            adapter.templates = list(templates)
        self._cache: dict = {}
        self._original = adapter.class_buffers()
        own = _trainer_classnames(adapter.trainer)
        if own is not None:
            self._check_reproduces(own)

    def build(self, classnames: Sequence[str]) -> dict:
        """The class-dependent state for ``classnames`` (built once per class set, then cached)."""
        key = tuple(classnames)
        if key not in self._cache:
            self._cache[key] = self.adapter.build_class_buffers(list(classnames), self.clip_model, self.tokenize)
        return self._cache[key]

    def _check_reproduces(self, classnames) -> None:
        rebuilt = self.build(classnames)
        problems = []
        for k, a in rebuilt.items():
            b = self._original.get(k)
            if not torch.is_tensor(a):
                if a != b:
                    problems.append(k)
            elif a.is_floating_point():
                b = b.float().to(a.device)
                if a.shape != b.shape or not torch.allclose(a.float(), b, atol=1e-3, rtol=1e-3):
                    problems.append(k)
            elif a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
                problems.append(k)
        if problems:
            raise AdapterError(
                f"the clip_model / tokenize given do not reproduce {type(self.adapter.trainer).__name__}'s own "
                f"{', '.join(problems)} for its classes: pass the frozen CLIP the trainer was built from and its tokenizer"
            )

    def use(self, classnames: Sequence[str]) -> None:
        """Put the state for ``classnames`` into the trainer's model."""
        self.adapter.use_class_buffers(self.build(classnames))

    def restore(self) -> None:
        """Put the trainer's own class-dependent state back."""
        self.adapter.use_class_buffers(self._original)


def meta_train(
    trainer,
    task_source,
    config: Optional[MetaConfig] = None,
    *,
    clip_model,
    tokenize: Callable,
    regulator=None,
    templates: Optional[Sequence[str]] = None,
    run_dir=None,
    steps: Optional[int] = None,
    resume=False,
    adapter: Optional[DasslAdapter] = None,
    metadata: Optional[dict] = None,
) -> PromptInit:
    """Meta-learn the trainer's prompt tensors on tasks with their own class sets; return the init.

    Args:
        trainer: a built (fp32) Dassl trainer with a registered adapter; the values of its parameters are
            not changed (the adapter's ``prepare_meta_training`` may cast a dtype, MaPLe's ``proj``).
        task_source: tasks whose support / query are standard CLIP batches (``images`` preprocessed to the
            trainer's input size, ``labels``, ``classnames``).
        config: :class:`MetaConfig` (inner/outer lr, inner steps, meta-batch, ``clip_gamma``, ...).
        clip_model / tokenize / templates: see :class:`ClassBuffers`.
        regulator: ``True`` (a fresh GradientRegulator over every prompt tensor: GRAM / UNIGRAM), a
            ``GradientRegulator``, or ``None`` (MAML, "MP-" methods).
        run_dir / resume: checkpoints and log of :class:`MetaPromptTrainer`; ``resume=True`` continues
            from ``run_dir``'s checkpoint.
        metadata: extra metadata for the exported init (e.g. the backbone name).
    """
    adapter = adapter or adapter_for(trainer)
    adapter.prepare_meta_training()
    params = adapter.prompt_parameters()
    half = [n for n, p in params.items() if p.dtype != torch.float32]
    model = adapter.model
    if half or getattr(model, "dtype", torch.float32) != torch.float32:
        options = " ".join(f"{k} {v}" for k, v in type(adapter).meta_train_cfg(getattr(trainer, "cfg", None)))
        raise AdapterError(
            f"meta-train on a float32 trainer: {half or 'the CLIP'} is not float32 (second-order gradients "
            f"need float32){f'; build the trainer with the options {options}' if options else ''}. "
            "The exported init loads into an fp16 trainer too."
        )
    config = config or MetaConfig()
    buffers = ClassBuffers(adapter, clip_model, tokenize, templates)

    def loss_on_batch(module, batch):
        if "images" not in batch:
            raise AdapterError("meta-training through a Dassl trainer needs image batches ('images'), not precomputed features")
        buffers.use(batch["classnames"])
        return adapter.method_loss(module, batch["images"].to(next(module.parameters()).device), batch["labels"])

    if regulator is False:
        regulator = None
    elif regulator is True:
        regulator = GradientRegulator({n: tuple(p.shape) for n, p in params.items()})
    name = adapter.method_name(regulator is not None, config.clip_gamma)
    metadata = {**(metadata or {}), "method_name": name, "trainer": type(trainer).__name__,
                "shapes": {n: list(p.shape) for n, p in params.items()}}
    meta = MetaPromptTrainer(
        module_loss(model, loss_on_batch),
        OrderedDict((n, p.detach().float()) for n, p in params.items()),
        regulator=regulator,
        config=config,
        run_dir=run_dir,
        metadata=metadata,
    )
    was_training = model.training
    try:
        init = meta.fit(task_source, steps=steps, resume=resume)
    finally:
        buffers.restore()
        model.train(was_training)
    init.metadata["method_name"] = name
    return init
