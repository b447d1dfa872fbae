"""The root of every error gram-plugin raises on purpose: :class:`GramPluginError`.

Each error class names what failed (``ConfigError``, ``ArtefactError``, ``DataError``, ...) and derives
from this root *and* from ``ValueError`` (bad input) or ``RuntimeError`` (cannot go on), so callers
may catch either. The command line catches the root (and ``OSError``) and prints one line; anything
else is a bug and keeps its traceback. This module imports nothing: every layer may import it.
"""


class GramPluginError(Exception):
    """An error gram-plugin raises on purpose, with a message that names the problem."""


__all__ = ["GramPluginError"]
