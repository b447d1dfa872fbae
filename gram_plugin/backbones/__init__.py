"""Frozen CLIP backbones behind one small protocol, so prompted models are backbone-agnostic.

* :mod:`.base`: the :class:`Backbone` protocol and :class:`BackboneLoadError`;
* :mod:`.openclip`: any open_clip CLIP (:class:`OpenCLIPBackbone`, :func:`tiny_openclip`);
* :mod:`.proxy` / :mod:`.proxy_v2`: the offline proxy CLIPs (the MiniLM text tower; v1's small CNN,
  v2's ImageNet EfficientNet-Lite0 + ConSE, the default);
* :mod:`.factory`: :func:`build_backbone`, every one of them by name.
"""

from .base import Backbone, BackboneLoadError
from .factory import build_backbone
from .openclip import OpenCLIPBackbone, default_preprocess, tiny_openclip

__all__ = ["Backbone", "BackboneLoadError", "build_backbone", "OpenCLIPBackbone", "default_preprocess", "tiny_openclip"]
