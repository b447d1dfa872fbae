"""A package's public names, imported from their modules on first use (PEP 562 ``__getattr__``).

``gram_plugin`` and ``gram_plugin.chc`` export names from modules that import torch, numpy or
sentence-transformers. Importing those modules eagerly in the package's ``__init__`` would make every
``import gram_plugin.<anything>`` pay for torch -- the command line included, which checks its whole
command line before it loads anything. With :func:`lazy_exports` the package imports a module the first
time one of its names is asked for; ``from gram_plugin import MetaConfig``, ``gram_plugin.MetaConfig``
and ``from gram_plugin import *`` work as with eager imports. This module imports nothing of the package.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, homes: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose names live in its modules.

    Args:
        package: the package's ``__name__``.
        homes: module (relative to the package, no dot) -> the names the package gives from it.

    The returned ``__getattr__`` imports a name's module, stores the name in the package (so it is
    looked up once) and returns it; for any other name it raises ``AttributeError``, as a module does.
    """
    home = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return __getattr__, __dir__
