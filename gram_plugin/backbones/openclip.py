"""open_clip CLIPs as backbones (:class:`~gram_plugin.backbones.base.Backbone`).

``OpenCLIPBackbone`` wraps any open_clip CLIP: built from a model name with a ``pretrained=`` tag
(needs internet the first time), from a local weights file, or from a model object you already have.
``tiny_openclip(seed)`` builds a small randomly initialised CLIP with the real tokenizer, for
offline demos and tests (no pretrained CLIP weights are needed anywhere in this package).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..safeio import file_sha256
from .base import BackboneLoadError


def default_preprocess(image_size: int):
    """CLIP's eval transform (resize shorter side, centre crop, CLIP mean/std)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.Lambda(lambda im: im.convert("RGB")),
            T.ToTensor(),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )


def _plain_attention_blocks(transformer: nn.Module) -> bool:
    """open_clip's standard text blocks (self-attention through nn.MultiheadAttention), batch-first,
    no gradient checkpointing: the blocks :meth:`OpenCLIPBackbone._text_transformer` may run itself."""
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:  # pragma: no cover - open_clip is what built the model
        return False
    if not getattr(transformer, "batch_first", False) or getattr(transformer, "grad_checkpointing", False):
        return False
    return all(
        type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
        and isinstance(b.attn, nn.MultiheadAttention) and b.attn._qkv_same_embed_dim and b.attn.batch_first
        for b in getattr(transformer, "resblocks", ())
    )


class OpenCLIPBackbone(nn.Module):
    """A frozen open_clip CLIP exposing the :class:`Backbone` protocol.

    Args:
        model: an open_clip model name (``"ViT-B-32"``) or an already-built open_clip ``CLIP``.
        pretrained: open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``) or a path to a
            local weights file; ``None`` keeps random weights (only sensible for tests).
        tokenizer: tokenizer name for ``open_clip.get_tokenizer`` (default: the model name, or
            ``"ViT-B-32"`` for a model object).
        name: weights identity used in metadata and cache keys (default derived from the weights).
    """

    def __init__(self, model, pretrained: str | None = None, tokenizer: str | None = None, name: str | None = None, preprocess=None):
        super().__init__()
        import open_clip

        if isinstance(model, str):
            model_name = model
            try:
                if pretrained is not None and os.path.sep in str(pretrained) and not Path(pretrained).exists():
                    raise FileNotFoundError(f"weights file {pretrained} does not exist")
                clip, _, pre = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
            except Exception as exc:  # one clear error whatever open_clip raised
                raise BackboneLoadError(
                    f"cannot load open_clip model {model_name!r} with pretrained={pretrained!r}: {exc}. "
                    "Pass a known open_clip name with a pretrained tag (needs internet once), or a local "
                    "weights file path via pretrained='/path/to/weights.pt'."
                ) from exc
            preprocess = preprocess or pre
            tokenizer = tokenizer or model_name
            self._id = name or f"{model_name}:{pretrained if pretrained else 'random'}"
            if pretrained and Path(str(pretrained)).exists():
                self._id = name or f"{model_name}:{file_sha256(pretrained)[:16]}"
        elif isinstance(model, nn.Module):
            clip = model
            self._id = name or f"{type(model).__name__}:{_state_digest(model)}"
            tokenizer = tokenizer or "ViT-B-32"
        else:
            raise TypeError(f"model must be an open_clip model name or an nn.Module, got {type(model).__name__}")
        for needed in ("token_embedding", "positional_embedding", "transformer", "ln_final", "visual"):
            if not hasattr(clip, needed):
                raise BackboneLoadError(f"model {type(clip).__name__} is not an open_clip CLIP (no .{needed})")
        self.clip = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.name = self._id
        self._tokenizer = open_clip.get_tokenizer(tokenizer)
        self.ctx_dim = int(clip.token_embedding.weight.shape[1])
        self.context_length = int(clip.positional_embedding.shape[0])
        proj = clip.text_projection
        self.embed_dim = int(proj.weight.shape[0] if isinstance(proj, nn.Linear) else proj.shape[1])
        visual = clip.visual
        self._vit = all(hasattr(visual, a) for a in ("conv1", "class_embedding", "transformer", "ln_pre"))
        self.vision_width = int(visual.class_embedding.shape[-1]) if self._vit else None
        self.vision_layers = len(visual.transformer.resblocks) if self._vit else 0
        size = getattr(visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.image_size = int(size)
        self.preprocess = preprocess or default_preprocess(self.image_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def weights_id(self) -> str:
        return self._id

    def train(self, mode: bool = True):  # the backbone stays in eval mode (no dropout) always
        return super().train(False)

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = self._tokenizer(list(texts))
        return ids[:, : self.context_length]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(ids.to(self.clip.token_embedding.weight.device))

    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        # the end-of-text token has the largest id in CLIP's vocabulary
        eot = ids.to(embeddings.device).argmax(dim=-1)
        mask = clip.attn_mask
        if mask is not None:
            # Causal mask: no position attends to a later one, so the tokens after the last
            # end-of-text cannot change what is pooled; dropping them is exact and cuts the text
            # tower's work from 77 positions to the longest prompt (benchmarks/README.md, text path runs A-C).
            try:
                n = int(eot.max()) + 1
            except RuntimeError:  # under torch.func.vmap the ids are batched: no single Python int
                n = embeddings.shape[1]
            embeddings, mask = embeddings[:, :n], mask[:n, :n]
        x = embeddings + clip.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
        x = self._text_transformer(x, mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _text_transformer(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``clip.transformer(x, attn_mask=mask)``, run sequence-first with contiguous activations.

        open_clip's blocks are batch-first, and nn.MultiheadAttention transposes its input to
        sequence-first before the q/k/v projection; on that non-contiguous input a linear layer
        that needs gradients runs as a batched matmul over copies of the weight (slower, and again in
        every backward: benchmarks/README.md, bench_meta_step's run C). Running the blocks sequence-first (what
        ``batch_first=False`` does) is the same arithmetic on contiguous tensors. Blocks of another
        kind, or gradient checkpointing, take open_clip's own path.
        """
        transformer = self.clip.transformer
        if not _plain_attention_blocks(transformer):
            return transformer(x, attn_mask=mask)
        x = x.transpose(0, 1).contiguous()  # NLD -> LND
        mask = mask.to(x.dtype) if mask is not None else None
        for block in transformer.resblocks:
            attn = block.attn
            h = block.ln_1(x)
            h = F.multi_head_attention_forward(
                h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias,
                attn.bias_k, attn.bias_v, attn.add_zero_attn, attn.dropout, attn.out_proj.weight,
                attn.out_proj.bias, training=attn.training, need_weights=False, attn_mask=mask,
            )[0]
            x = x + block.ls_1(h)
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x.transpose(0, 1)

    # -- images --------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, visual_prompts: list[torch.Tensor] | None = None) -> torch.Tensor:
        if not visual_prompts:
            return self.clip.encode_image(images)
        if not self._vit:
            raise ValueError("visual prompts need a ViT image tower; this backbone has none")
        v = self.clip.visual
        if len(visual_prompts) > self.vision_layers:
            raise ValueError(f"{len(visual_prompts)} visual prompt layers given, image tower has {self.vision_layers}")
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        n_tokens = x.shape[1]
        # VPT: prompt tokens appended after the patch tokens (no position embedding);
        # deep VPT replaces them with that layer's own prompts before every listed layer.
        x = torch.cat([x, visual_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            if 0 < i < len(visual_prompts):
                vp = visual_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :n_tokens], vp], dim=1)
            if batch_first:
                x = block(x)
            else:
                x = block(x.transpose(0, 1)).transpose(0, 1)
        x = x[:, :n_tokens]  # pool over image tokens only
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


def _state_digest(model: nn.Module) -> str:
    """A short hash of a model's weights (identity of a model object for cache keys)."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tiny_openclip(seed: int = 0, image_size: int = 32, embed_dim: int = 32, text_width: int = 32,
                  vision_width: int = 64, layers: int = 2) -> OpenCLIPBackbone:
    """A small randomly initialised open_clip CLIP (real tokenizer, 77 tokens) for offline use."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(layers=layers, width=vision_width, head_width=32, patch_size=8, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=layers),
    )
    return OpenCLIPBackbone(model, name=f"tiny-openclip-seed{seed}-{image_size}px")
