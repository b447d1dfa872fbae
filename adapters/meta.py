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
embeddings. :class:`ClassBuffers` rebuilds that state for each task's classes the way the trainer's
own ``__init__`` does (same prompt text, same frozen token embedding, same templates), while the
learnable tensors are shared across tasks; the trainer's own state is restored afterwards. The
rebuild is checked once against the trainer's buffers for its own classes, so a wrong
``clip_model`` / ``tokenize`` fails loudly instead of training on wrong prompts.

Forward passes run through the trainer's own model code (``torch.func.functional_call`` with the
fast weights), so whatever the method computes -- MaPLe's coupling functions, PromptSRC's frozen
zero-shot encoder -- is what is meta-learned. The loss is the one the trainer optimises: cross-entropy
of its logits; for PromptSRC CE + its self-regularising L1 / KL terms against the task's own fixed
embeddings and zero-shot features.

The exported :class:`PromptInit` is keyed by the trainer's parameter names, so the same trainer
(any class split, any precision) loads it with the three-line wrap::

    init = meta_train(trainer, tasks, MetaConfig(...), clip_model=clip, tokenize=clip_tokenize, regulator=True)
    init.save("init.safetensors")
    # later, in train.py:  wrap(build_trainer(cfg), init="init.safetensors")

Meta-train on a float32 trainer (``PREC fp32``): second-order gradients in fp16 are not usable.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from gram_plugin.meta import MetaConfig, MetaPromptTrainer, module_loss
from gram_plugin.prompts import PromptInit
from gram_plugin.regulator import GradientRegulator

from .base import AdapterError, DasslAdapter, adapter_for
from .promptsrc import encoder_dtype

__all__ = ["meta_train", "ClassBuffers", "method_loss", "method_name"]

# trainer class name -> its cfg.TRAINER node
_CFG_NODES = {"CoOp": "COOP", "ProGrad": "COOP", "CoCoOp": "COCOOP", "VPT": "VPT", "IVLP": "IVLP", "MaPLe": "MAPLE", "PromptSRC": "PROMPTSRC"}


def _family(adapter: DasslAdapter) -> str:
    for klass in type(adapter.trainer).__mro__:
        if klass.__name__ in _CFG_NODES:
            return klass.__name__
    raise AdapterError(
        f"meta-training through {type(adapter.trainer).__name__} is not supported (it needs to know how the "
        f"trainer builds its class-dependent buffers); supported: {', '.join(_CFG_NODES)}"
    )


def method_name(trainer, regulator: bool, clip_gamma) -> str:
    family = _family(adapter_for(trainer))
    if regulator:
        return "UNIGRAM" if family in ("IVLP", "PromptSRC") else f"GRAM-{family}"
    return f"MP-{family}" + ("+clip" if clip_gamma else "")


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

    Args:
        adapter: the trainer's adapter.
        clip_model: a frozen, prompt-free CLIP with the trainer's pretrained weights (``token_embedding``
            and ``encode_text``), e.g. the repository's ``load_clip_to_cpu(cfg)`` for CoOp/CoCoOp or a
            second plain CLIP for the VPT family (their CLIP's text tower is prompted).
        tokenize: the tokenizer the trainer used (``clip.tokenize`` upstream).
        templates: PromptSRC's text templates (default: ``IMAGENET_TEMPLATES`` or ``TEMPLATES`` of the
            trainer's module).
    """

    def __init__(self, adapter: DasslAdapter, clip_model, tokenize: Callable, templates: Optional[Sequence[str]] = None):
        self.adapter, self.clip_model, self.tokenize = adapter, clip_model, tokenize
        self.family = _family(adapter)
        self.model = adapter.model
        self.pl = getattr(self.model, "prompt_learner", None)
        node = getattr(getattr(adapter.trainer, "cfg", None), "TRAINER", None)
        self.node = getattr(node, _CFG_NODES[self.family], None) if node is not None else None
        if self.pl is not None and self.pl.ctx.dim() == 3:
            raise AdapterError("class-specific context (CSC) has one context per class: it cannot be shared by tasks with other classes")
        self.templates = list(templates) if templates is not None else None
        if self.family == "PromptSRC" and self.templates is None:
            module = sys.modules.get(type(adapter.trainer).__module__)
            for name in ("IMAGENET_TEMPLATES", "TEMPLATES"):
                if hasattr(module, name):
                    self.templates = list(getattr(module, name))
                    break
            if self.templates is None:
                raise AdapterError("PromptSRC: pass templates=[...] (the text templates its fixed embeddings average over)")
        self._cache: dict = {}
        self._original = self._snapshot()
        own = _trainer_classnames(adapter.trainer)
        if own is not None:
            self._check_reproduces(own)

    # -- what the trainer built for its own classes -------------------------------------------
    def _snapshot(self) -> dict:
        s = {}
        if self.pl is not None:
            s.update(token_prefix=self.pl.token_prefix, token_suffix=self.pl.token_suffix,
                     tokenized=self.pl.tokenized_prompts, n_cls=self.pl.n_cls)
        if self.family == "VPT":
            s["fixed"] = self.model.embeddings.fixed_embeddings
        if self.family == "PromptSRC":
            s["fixed"] = self.pl.fixed_embeddings
        return s

    def _prompt_prefix(self) -> tuple[str, int]:
        n_ctx = self.pl.n_ctx
        ctx_init = str(getattr(self.node, "CTX_INIT", "") or "")
        if ctx_init and (self.family in ("CoOp", "ProGrad", "CoCoOp") or n_ctx <= 4):
            return ctx_init.replace("_", " "), n_ctx
        return " ".join(["X"] * n_ctx), n_ctx

    @torch.no_grad()
    def build(self, classnames: Sequence[str]) -> dict:
        key = tuple(classnames)
        if key in self._cache:
            return self._cache[key]
        names = [c.replace("_", " ") for c in classnames]
        s: dict = {"n_cls": len(names)}
        device = next(self.model.parameters()).device
        if self.pl is not None:
            prefix, n_ctx = self._prompt_prefix()
            tokenized = self.tokenize([prefix + " " + n + "." for n in names])
            emb = self.clip_model.token_embedding(tokenized.to(self.clip_model.token_embedding.weight.device))
            dtype = self._original["token_prefix"].dtype
            s.update(token_prefix=emb[:, :1, :].to(device, dtype), token_suffix=emb[:, 1 + n_ctx:, :].to(device, dtype),
                     tokenized=tokenized.to(self._original["tokenized"].device))
        if self.family == "VPT":
            s["fixed"] = self.clip_model.encode_text(self.tokenize(["a photo of a " + n + "." for n in names])).to(device)
        if self.family == "PromptSRC":
            feats = [self.clip_model.encode_text(self.tokenize([t.replace("{}", n) for n in names])).float() for t in self.templates]
            s["fixed"] = torch.stack(feats, dim=1).mean(dim=1).to(device)
        self._cache[key] = s
        return s

    def _check_reproduces(self, classnames) -> None:
        rebuilt = self.build(classnames)
        problems = []
        for k in ("token_prefix", "token_suffix", "fixed"):
            if k in rebuilt:
                a, b = rebuilt[k].float(), self._original[k].float().to(rebuilt[k].device)
                if a.shape != b.shape or not torch.allclose(a, b, atol=1e-3, rtol=1e-3):
                    problems.append(k)
        if "tokenized" in rebuilt and not torch.equal(rebuilt["tokenized"].cpu(), self._original["tokenized"].cpu()):
            problems.append("tokenized_prompts")
        if problems:
            raise AdapterError(
                f"the clip_model / tokenize given do not reproduce {type(self.adapter.trainer).__name__}'s own "
                f"{', '.join(problems)} for its classes: pass the frozen CLIP the trainer was built from and its tokenizer"
            )

    # -- swapping ---------------------------------------------------------------------------------
    def _apply(self, s: dict) -> None:
        if self.pl is not None:
            self.pl.token_prefix = s["token_prefix"]  # assignment to a registered buffer replaces it
            self.pl.token_suffix = s["token_suffix"]
            self.pl.tokenized_prompts = s["tokenized"]
            self.pl.n_cls = s["n_cls"]
            self.model.tokenized_prompts = s["tokenized"]
        if self.family == "VPT":
            self.model.embeddings.fixed_embeddings = s["fixed"]
        if self.family == "PromptSRC":
            self.pl.fixed_embeddings = s["fixed"]
            self.model.n_cls = s["n_cls"]

    def use(self, classnames: Sequence[str]) -> None:
        self._apply(self.build(classnames))

    def restore(self) -> None:
        self._apply(self._original)


def _inputs_to_own_dtype(module, args):
    dtype = encoder_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def method_loss(adapter: DasslAdapter) -> Callable:
    """``loss(model, images, labels)``: the loss the trainer optimises, on an unwrapped CustomCLIP."""
    family = _family(adapter)
    trainer = adapter.trainer

    def logits_of(model, images):
        pl = getattr(model, "prompt_learner", None)
        if family == "VPT" or pl is None:
            return model(images)
        was = pl.training
        pl.training = False  # CoCoOp / IVLP / MaPLe / PromptSRC return the loss while this flag is set
        try:
            return model(images)
        finally:
            pl.training = was

    if family != "PromptSRC":
        return lambda model, images, labels: F.cross_entropy(logits_of(model, images).float(), labels)

    node = trainer.cfg.TRAINER.PROMPTSRC

    def promptsrc_loss(model, images, labels):
        pl = model.prompt_learner
        was = pl.training
        pl.training = True
        # Upstream builds the frozen zero-shot encoder in fp16 whatever PREC says and feeds it
        # ``image.type(self.dtype)``: on a float32 trainer that is fp32 images into an fp16 conv, so
        # upstream's own forward fails under PREC fp32. Feed the teacher in its own dtype (its
        # features then meet ``fixed_embeddings.half()`` as upstream expects); a no-op under fp16.
        cast = pl.ZS_image_encoder.register_forward_pre_hook(_inputs_to_own_dtype)
        try:
            ce, text_f, fixed, zs_image, image_f, zs_logits, logits = model(images, labels)
        finally:
            pl.training = was
            cast.remove()
        l_text = F.l1_loss(text_f, fixed.to(text_f.dtype)) * float(node.TEXT_LOSS_WEIGHT)
        l_image = F.l1_loss(image_f, zs_image.to(image_f.dtype)) * float(node.IMAGE_LOSS_WEIGHT)
        l_logits = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits.to(logits.dtype), 1), reduction="sum", log_target=True) / logits.numel()
        return ce + (l_logits + l_text + l_image)

    return promptsrc_loss


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
    adapter: Optional[DasslAdapter] = None,
) -> PromptInit:
    """Meta-learn the trainer's prompt tensors on tasks with their own class sets; return the init.

    Args:
        trainer: a built (fp32) Dassl trainer with a registered adapter; its parameters are not changed.
        task_source: tasks whose support / query are standard CLIP batches (``images`` preprocessed to the
            trainer's input size, ``labels``, ``classnames``).
        config: :class:`MetaConfig` (inner/outer lr, inner steps, meta-batch, ``clip_gamma``, ...).
        clip_model / tokenize / templates: see :class:`ClassBuffers`.
        regulator: ``True`` (a fresh GradientRegulator over every prompt tensor: GRAM / UNIGRAM), a
            ``GradientRegulator``, or ``None`` (MAML, "MP-" methods).
    """
    adapter = adapter or adapter_for(trainer)
    params = adapter.prompt_parameters()
    half = [n for n, p in params.items() if p.dtype != torch.float32]
    model = adapter.model
    if half or getattr(model, "dtype", torch.float32) != torch.float32:
        raise AdapterError(
            f"meta-train on a float32 trainer (PREC fp32): {half or 'the CLIP'} is not float32. "
            "The exported init loads into an fp16 trainer too."
        )
    config = config or MetaConfig()
    buffers = ClassBuffers(adapter, clip_model, tokenize, templates)
    loss_on_model = method_loss(adapter)

    def loss_on_batch(module, batch):
        if "images" not in batch:
            raise AdapterError("meta-training through a Dassl trainer needs image batches ('images'), not precomputed features")
        buffers.use(batch["classnames"])
        return loss_on_model(module, batch["images"].to(next(module.parameters()).device), batch["labels"])

    if regulator is False:
        regulator = None
    elif regulator is True:
        regulator = GradientRegulator({n: tuple(p.shape) for n, p in params.items()})
    name = method_name(trainer, regulator is not None, config.clip_gamma)
    metadata = {"method_name": name, "trainer": type(trainer).__name__, "shapes": {n: list(p.shape) for n, p in params.items()}}
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
        init = meta.fit(task_source, steps=steps)
    finally:
        buffers.restore()
        model.train(was_training)
    init.metadata["method_name"] = name
    return init
