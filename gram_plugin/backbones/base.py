"""What every backbone is: the :class:`Backbone` protocol, and :class:`BackboneLoadError`.

Prompted models (:mod:`gram_plugin.models`) and the feature cache use a backbone only through this
protocol, so they work with any of them (open_clip CLIPs, the offline proxies, your own).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..errors import GramPluginError


class BackboneLoadError(GramPluginError, RuntimeError):
    """The requested CLIP weights could not be loaded."""


@runtime_checkable
class Backbone(Protocol):
    name: str
    ctx_dim: int
    embed_dim: int
    vision_width: int | None
    vision_layers: int
    logit_scale: torch.Tensor
    preprocess: Callable

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...
    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor: ...
    def encode_image(self, images: torch.Tensor, visual_prompts: list[torch.Tensor] | None = None) -> torch.Tensor: ...
    def weights_id(self) -> str: ...
