"""Pixel-space visual prompts (Bahng et al. 2022, "Exploring Visual Prompts for Adapting Large-Scale
Models", arXiv 2203.17274): a learnable image v added to the *normalised* input before a frozen image
tower, x' = x + v. It needs nothing from the tower but its input size, so it prompts any
architecture (a CNN such as ProxyCLIP v2's EfficientNet-Lite0, or a ViT).

Layouts:

* ``"padding"`` (the paper's best): v is learned on a border ``pad`` pixels wide and zero inside,
  so the centre of the image is untouched. The paper uses pad 30 at 224 px; the default here keeps
  that fraction of the side (``round(30 * size / 224)``: 17 at 128 px).
* ``"patch"``: v is learned on every pixel (a full-image additive prompt).

Storage layout ``(pixels, 3)``, channels last: the parameter holds the learned pixels' RGB values
(border pixels in row-major order). :class:`~gram_plugin.regulator.GradientRegulator` builds its
heads on the LAST dimension of a prompt tensor and shares them across the others, so this layout
gives the pixel prompt a per-channel head: 3 x 3 maps, 2 * (9 + 3) = 24 parameters, shared by every
pixel, and independent of the image size. Stored as an image (3, H, W), the head would be W x W
(2 * (224^2 + 224) = 100k parameters at 224 px), tie the regulator to one width, and mix pixels of
a row that have nothing to do with each other.

Initialisation: zeros, so the prompted model starts as the zero-shot model (the paper draws
N(0, 1) for a prompt trained from scratch; a meta-learned init replaces either).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LAYOUTS

PAPER_PAD, PAPER_SIZE = 30, 224


def default_pad(image_size: int) -> int:
    """The paper's pad width (30 px at 224 px) scaled to ``image_size``."""
    return max(1, round(PAPER_PAD * image_size / PAPER_SIZE))


class PixelPrompt(nn.Module):
    """A learnable additive image prompt for (N, 3, H, W) inputs of one fixed size.

    Args:
        image_size: H = W of the images the tower receives (after preprocessing).
        layout: ``"padding"`` (border of width ``pad``) or ``"patch"`` (every pixel).
        pad: border width in pixels (``"padding"`` only; default :func:`default_pad`).
    """

    def __init__(self, image_size: int, layout: str = "padding", pad: int | None = None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"pixel prompt layout must be one of {LAYOUTS}, got {layout!r}")
        if not (isinstance(image_size, int) and image_size >= 2):
            raise ValueError(f"image_size must be an int >= 2, got {image_size!r}")
        if layout == "patch":
            if pad not in (None, 0):
                raise ValueError(f"pad applies to the 'padding' layout only (a 'patch' prompt covers the image), got {pad!r}")
            pad = 0
        else:
            pad = default_pad(image_size) if pad is None else pad
            if not (isinstance(pad, int) and 1 <= pad and 2 * pad < image_size):
                raise ValueError(f"pad must be an int in [1, {(image_size - 1) // 2}] for {image_size} px images, got {pad!r}")
        self.image_size, self.layout, self.pad = image_size, layout, pad
        rows = torch.arange(image_size).view(-1, 1)
        cols = torch.arange(image_size).view(1, -1)
        inner = (rows >= pad) & (rows < image_size - pad) & (cols >= pad) & (cols < image_size - pad)
        learned = ~inner if layout == "padding" else torch.ones_like(inner)
        # flat (row-major) positions of the learned pixels; the image is rebuilt from them each call
        self.register_buffer("positions", learned.flatten().nonzero().flatten(), persistent=False)
        self.prompt = nn.Parameter(torch.zeros(len(self.positions), 3))

    def image(self) -> torch.Tensor:
        """The prompt as an image (3, H, W): learned pixels where the layout has them, zero elsewhere."""
        n = self.image_size
        flat = self.prompt.new_zeros(n * n, 3).index_copy(0, self.positions, self.prompt)
        return flat.t().reshape(3, n, n)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (N, 3, S, S) with the prompt added where the layout puts it; raises ``ValueError`` for another size."""
        n = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, n, n):
            raise ValueError(f"pixel prompt expects images (N, 3, {n}, {n}) (the size it was built for), "
                             f"got {tuple(images.shape)}")
        return images + self.image().to(images.dtype)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, layout={self.layout!r}, pad={self.pad}, pixels={len(self.positions)}"


__all__ = ["PixelPrompt", "default_pad", "LAYOUTS"]
