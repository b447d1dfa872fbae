"""Prompted CLIP over any :class:`~gram_plugin.backbones.Backbone`: CoOp, VPT, and both (UNIGRAM).

Text prompts follow CoOp: the prompt is ``[SOS] ctx_1 .. ctx_n {classname}. [EOS]`` built by
tokenising ``"X X .. X {classname}."`` and replacing the n placeholder embeddings with the learned
context. Visual prompts are either VPT tokens (shallow: tokens at the input; deep: fresh tokens per
layer; ViT towers only) or a pixel-space prompt added to the image (Bahng et al. 2022; any tower,
:mod:`gram_plugin.pixel_prompt`). On a tower without tokens (ProxyCLIP v2's CNN) ``"vpt"`` and
``"unigram"`` therefore use the pixel prompt: UNIGRAM there is text context + pixel prompt.
Only the prompt tensors are parameters that train; the backbone is frozen.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# defined torch-free (the CLI checks them before importing torch); exported here
from .config import MODES, VISUAL_PROMPTS, PromptConfig  # noqa: F401 (MODES: re-exported)
from .marking import mark_prompts
from .pixel_prompt import PixelPrompt


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features are compared in float32; float64 stays float64 (exact gradient tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class PromptedCLIP(nn.Module):
    """Prompt-tuned CLIP classifier.

    Args:
        backbone: a frozen Backbone (e.g. ``OpenCLIPBackbone``).
        mode: ``"coop"`` (text context), ``"vpt"`` (visual prompts) or ``"unigram"`` (both).
        n_ctx: number of text context vectors.
        ctx_init: phrase to initialise the context from (its word count must equal n_ctx), or
            ``None`` for random N(0, 0.02) init as in CoOp.
        n_vpt: visual prompt tokens per layer; ``vpt_deep``: one set per image-tower layer.
        visual_prompt: ``"tokens"`` (VPT) or ``"pixels"`` (:class:`~gram_plugin.pixel_prompt.PixelPrompt`);
            ``None`` picks tokens when the image tower has them (``backbone.vision_width``), else pixels.
        pixel_layout, pixel_pad: the pixel prompt's layout (``"padding"`` / ``"patch"``) and border
            width (default: the paper's 30 px at 224 px, scaled to ``backbone.image_size``).
        classnames: initial class names (``set_classnames`` changes them).
    """

    def __init__(self, backbone, mode: str = PromptConfig.mode, n_ctx: int = PromptConfig.n_ctx,
                 ctx_init: str | None = PromptConfig.ctx_init, n_vpt: int = PromptConfig.n_vpt,
                 vpt_deep: bool = PromptConfig.vpt_deep, classnames: list[str] | None = None, seed: int = 0,
                 visual_prompt: str | None = PromptConfig.visual_prompt,
                 pixel_layout: str = PromptConfig.pixel_layout, pixel_pad: int | None = PromptConfig.pixel_pad):
        super().__init__()
        PromptConfig(mode, n_ctx, ctx_init, n_vpt, vpt_deep, visual_prompt, pixel_layout, pixel_pad).check_backbone(backbone)
        self.backbone = backbone
        self.mode = mode
        self.uses_text_prompt = mode in ("coop", "unigram")
        self.uses_visual_prompt = mode in ("vpt", "unigram")
        gen = torch.Generator().manual_seed(seed)
        dtype = backbone.embed_tokens(backbone.tokenize(["a"])).dtype
        self.n_ctx = n_ctx if self.uses_text_prompt else 0
        self.ctx_init = ctx_init
        names = []
        if self.uses_text_prompt:
            if ctx_init:
                words = ctx_init.replace("_", " ").split()
                with torch.no_grad():
                    emb = backbone.embed_tokens(backbone.tokenize([" ".join(words)]))[0]
                ctx = emb[1 : 1 + n_ctx].detach().clone()
                # one word may become several BPE tokens; the first n_ctx tokens are the ones CoOp uses
            else:
                ctx = torch.randn(n_ctx, backbone.ctx_dim, generator=gen) * 0.02
            self.ctx = nn.Parameter(ctx.to(dtype))
            names.append("ctx")
        if visual_prompt is None:
            visual_prompt = "tokens" if backbone.vision_width is not None else "pixels"
        if visual_prompt not in VISUAL_PROMPTS:
            raise ValueError(f"visual_prompt must be one of {VISUAL_PROMPTS} or None, got {visual_prompt!r}")
        self.visual_prompt = visual_prompt if self.uses_visual_prompt else None
        self.pixel_prompt = None
        if self.uses_visual_prompt and visual_prompt == "pixels":
            size = getattr(backbone, "image_size", None)
            if not isinstance(size, int):
                raise ValueError(f"backbone {backbone.name} has no integer image_size: a pixel prompt needs the input size")
            self.pixel_prompt = PixelPrompt(size, pixel_layout, pixel_pad)
            names.append("pixel_prompt.prompt")
        elif self.uses_visual_prompt:
            if backbone.vision_width is None:
                raise ValueError(f"backbone {backbone.name} has no visual tokens to prompt; use visual_prompt='pixels'")
            layers = backbone.vision_layers if vpt_deep else 1
            self.vpt = nn.ParameterList(
                [nn.Parameter(torch.randn(n_vpt, backbone.vision_width, generator=gen) * 0.02) for _ in range(layers)]
            )
            names += [f"vpt.{i}" for i in range(layers)]
        self.n_vpt = n_vpt if self.visual_prompt == "tokens" else 0
        self.vpt_deep = vpt_deep and self.visual_prompt == "tokens"
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        mark_prompts(self, names=names)
        self.classnames: list[str] = []
        if classnames is not None:
            self.set_classnames(classnames)

    # -- classes -------------------------------------------------------------------------------
    def set_classnames(self, classnames: list[str]) -> None:
        """Rebuild the class-dependent token buffers (one model serves tasks with different classes)."""
        classnames = [str(c).replace("_", " ") for c in classnames]
        if not classnames:
            raise ValueError("set_classnames needs at least one class name")
        if list(classnames) == self.classnames:
            return
        self.classnames = list(classnames)
        bb = self.backbone
        placeholder = " ".join(["X"] * self.n_ctx)
        texts = [f"{placeholder} {c}." if self.n_ctx else f"a photo of a {c}." for c in classnames]
        ids = bb.tokenize(texts)
        with torch.no_grad():
            emb = bb.embed_tokens(ids)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx :].clone(), persistent=False)  # class, '.', EOS
        if not self.uses_text_prompt:  # fixed hand-crafted prompt: text features computed once
            with torch.no_grad():
                self.register_buffer("fixed_text", bb.encode_text_embeddings(emb, ids), persistent=False)

    # -- forward -------------------------------------------------------------------------------
    def visual_prompts(self) -> list[torch.Tensor] | None:
        """The visual prompt tokens per layer (VPT / UNIGRAM with token prompts), else ``None``."""
        return list(self.vpt) if self.visual_prompt == "tokens" else None

    def text_features(self) -> torch.Tensor:
        """Text features of the current class names with the learned context (the fixed ones without a text prompt).

        Raises ``RuntimeError`` when no class names are set."""
        if not self.classnames:
            raise RuntimeError("no class names set: call set_classnames(list) or pass batch['classnames']")
        if not self.uses_text_prompt:
            return self.fixed_text
        n = len(self.classnames)
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(n, -1, -1)
        emb = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        return self.backbone.encode_text_embeddings(emb, self.token_ids)

    def image_features(self, batch: dict) -> torch.Tensor:
        """Image features of a batch: its cached ``features``, or ``images`` through the (prompted) image tower.

        Raises ``ValueError`` for cached features when visual prompts are learned, ``KeyError`` for neither."""
        if "features" in batch:
            if self.uses_visual_prompt:
                raise ValueError("batch has precomputed 'features' but this model learns visual prompts; pass 'images'")
            return batch["features"]
        if "images" in batch:
            images = batch["images"] if self.pixel_prompt is None else self.pixel_prompt(batch["images"])
            return self.backbone.encode_image(images, self.visual_prompts())
        raise KeyError("batch needs 'images' or 'features'")

    def logits(self, batch: dict | torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine logits of the batch's images against the class prompts.

        ``text_features``: the result of :meth:`text_features` for the current classes, to reuse
        across batches (text features do not depend on the images, so evaluation encodes the
        class prompts once instead of once per batch).
        """
        if isinstance(batch, torch.Tensor):
            batch = {"images": batch}
        if "classnames" in batch:
            self.set_classnames(list(batch["classnames"]))
        return self._cosine_logits(self.image_features(batch),
                                   self.text_features() if text_features is None else text_features)

    def _cosine_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(_at_least_float32(image_features), dim=-1)
        txt = F.normalize(_at_least_float32(text_features), dim=-1).to(img.dtype)
        return _at_least_float32(self.backbone.logit_scale).to(img.dtype) * img @ txt.t()

    forward = logits

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the logits of a standard batch (``images`` or ``features``, ``labels``, optional ``classnames``)."""
        return self._cross_entropy(self.logits(batch), batch)

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"].to(torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
            raise ValueError(f"labels run from {int(labels.min())} to {int(labels.max())} but the batch has "
                             f"{logits.shape[-1]} class names (mismatched class counts)")
        return F.cross_entropy(logits, labels)

    def _class_token_ids(self, classnames) -> torch.Tensor:
        """Token ids of the class prompts (as :meth:`set_classnames` builds them), cached per class list."""
        key = tuple(str(c).replace("_", " ") for c in classnames)
        cache = self.__dict__.setdefault("_token_id_cache", OrderedDict())
        if key not in cache:
            placeholder = " ".join(["X"] * self.n_ctx)
            cache[key] = self.backbone.tokenize([f"{placeholder} {c}." for c in key])
            while len(cache) > 256:  # ids only (classes x 77 ints): a few MB at most
                cache.popitem(last=False)
        return cache[key]

    def batched_losses(self, params_list: list, batches: list) -> list[torch.Tensor]:
        """Losses of several tasks through one text-tower forward (CoOp mode).

        Task i's class prompts are built from its own context ``params_list[i]["ctx"]`` and its
        ``batches[i]["classnames"]``; the rows of all tasks are stacked into one batch for the text
        tower, then split back. Same values as ``[loss with ctx = p["ctx"] on b]`` per task, without
        touching the model's current class names. Used by :class:`~gram_plugin.metabatch.BatchedMetaStep`.
        """
        if not (self.uses_text_prompt and not self.uses_visual_prompt):
            raise ValueError(f"batched_losses needs text prompts only (mode 'coop'), not mode {self.mode!r}")
        if any("classnames" not in batch for batch in batches):
            raise KeyError("batched_losses needs batch['classnames'] for every task")
        # one tokenizer call for all tasks: a tokenizer that pads to the longest text of the call
        # (the proxies' MiniLM) then gives every task's ids the same length
        sizes = [len(batch["classnames"]) for batch in batches]
        all_ids = self._class_token_ids([c for batch in batches for c in batch["classnames"]]).split(sizes)
        rows, ids = [], []
        for params, task_ids in zip(params_list, all_ids):
            emb = self.backbone.embed_tokens(task_ids)
            ctx = params["ctx"].to(emb.dtype).unsqueeze(0).expand(len(task_ids), -1, -1)
            rows.append(torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1))
            ids.append(task_ids)
        text = self.backbone.encode_text_embeddings(torch.cat(rows), torch.cat(ids))
        losses = []
        for batch, txt in zip(batches, text.split(sizes)):
            losses.append(self._cross_entropy(self._cosine_logits(self.image_features(batch), txt), batch))
        return losses

    @torch.no_grad()
    def accuracy(self, batch: dict) -> float:
        """Top-1 accuracy on a standard batch."""
        pred = self.logits(batch).argmax(-1)
        return float((pred == batch["labels"]).float().mean())

    def meta_loss_fn(self):
        """``loss_fn(params, batch)`` for :class:`~gram_plugin.meta.MetaPromptTrainer`."""
        from .marking import module_loss

        fn = module_loss(self, lambda module, batch: module.loss(batch))
        if self.uses_text_prompt and not self.uses_visual_prompt:
            fn.batched = self.batched_losses  # lets BatchedMetaStep run a meta-batch in one text forward
        return fn

    def config(self) -> dict[str, Any]:
        """The prompt settings and backbone name, recorded in an init's metadata (and checked when it is loaded)."""
        out = {"mode": self.mode, "n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "n_vpt": self.n_vpt,
               "vpt_deep": self.vpt_deep, "backbone": self.backbone.name}
        if self.pixel_prompt is not None:
            pp = self.pixel_prompt
            out.update(visual_prompt="pixels", pixel_layout=pp.layout, pixel_pad=pp.pad, image_size=pp.image_size)
        return out

