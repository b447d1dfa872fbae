"""Every backbone gram-plugin can build, by name: :func:`build_backbone` (the CLI's ``--backbone``)."""

from __future__ import annotations

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
    kind, _, rest = spec.partition(":")
    if kind == "proxy":
        if rest:
            raise BackboneLoadError(f"--backbone proxy takes no argument (got {spec!r}); a built folder of the "
                                    "earlier proxy is proxy-v1:DIR")
        from .proxy_v2 import ProxyCLIPv2

        return ProxyCLIPv2()
    if kind == "proxy-v1":
        from .proxy import load_proxy

        return load_proxy(rest or None)
    if kind == "tiny":
        try:
            seed = int(rest) if rest else 0
        except ValueError:
            raise BackboneLoadError(f"backbone tiny:SEED needs a whole-number seed, got {rest!r}") from None
        return tiny_openclip(seed)
    return OpenCLIPBackbone(kind, pretrained=rest or None)
