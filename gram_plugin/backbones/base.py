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
    """A frozen CLIP as prompted models use it: a text tower fed token embeddings, an image tower.

    Attributes: ``name``; ``ctx_dim`` (token embedding width: a text prompt's width); ``embed_dim``
    (the joint space); ``vision_width`` / ``vision_layers`` (the image tower's token width and depth
    for visual prompts; ``vision_width`` None: no tokens to prompt); ``logit_scale``; ``preprocess``
    (PIL image -> input tensor); optionally ``context_length``, the longest token sequence the text
    tower takes.
    """

    name: str
    ctx_dim: int
    embed_dim: int
    vision_width: int | None
    vision_layers: int
    logit_scale: torch.Tensor
    preprocess: Callable

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, L) of ``texts``; a prompt's context placeholders sit right after the start token."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The frozen token embeddings (N, L, ctx_dim) of ``ids``: what soft prompts replace rows of."""

    def encode_text_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Text features (N, embed_dim) of token embeddings (prompts spliced in); ``ids`` give lengths / pooling."""

    def encode_image(self, images: torch.Tensor, visual_prompts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Image features (N, embed_dim) of preprocessed ``images``, with per-layer visual prompt tokens if given."""

    def weights_id(self) -> str:
        """A short identity of the weights (name and digest), used in cache keys and an init's metadata."""
