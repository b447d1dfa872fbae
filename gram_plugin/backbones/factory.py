"""Every backbone gram-plugin can build, by name: :func:`build_backbone` (the CLI's ``--backbone``)."""

from __future__ import annotations

from ..config import backbone_problems
from .base import BackboneLoadError
from .openclip import OpenCLIPBackbone, tiny_openclip


def build_backbone(spec: str):
    """Every backbone gram-plugin can build, by name (the CLI's ``--backbone``):

    * ``proxy`` (the default): ProxyCLIP v2, offline and zero-shot capable: ImageNet EfficientNet-Lite0
      + ConSE into the pretrained MiniLM text tower (gram_plugin/proxy_v2.py; extra ``[proxy]``).
    * ``proxy-v1`` / ``proxy-v1:DIR``: the earlier proxy (MiniLM + a small CNN trained here on base
      classes; the build shipped in the package, or a built folder; gram_plugin/proxy.py).
    * ``tiny`` / ``tiny:SEED``: a random tiny open_clip CLIP (tests, smoke runs).
    * ``MODEL:PRETRAINED``: an open_clip model with a pretrained tag or a local weights file.
    """
    problems = backbone_problems(spec)  # the CLI's plan asks the same before torch is imported
    if problems:
        raise BackboneLoadError(problems[0])
    kind, _, rest = spec.partition(":")
    if kind == "proxy":
        from .proxy_v2 import ProxyCLIPv2

        return ProxyCLIPv2()
    if kind == "proxy-v1":
        from .proxy import load_proxy

        return load_proxy(rest or None)
    if kind == "tiny":
        return tiny_openclip(int(rest) if rest else 0)
    return OpenCLIPBackbone(kind, pretrained=rest or None)
