"""The root of every error gram-plugin raises on purpose: :class:`GramPluginError`.

Each error class names what failed (``ConfigError``, ``ArtefactError``, ``DataError``, ...) and derives
from this root *and* from ``ValueError`` (bad input) or ``RuntimeError`` (cannot go on), so callers
may catch either. The command line catches the root (and ``OSError``) and prints one line; anything
else is a bug and keeps its traceback. This module imports nothing: every layer may import it.
"""


class GramPluginError(Exception):
    """An error gram-plugin raises on purpose, with a message that names the problem."""


# errors of artefacts that several layers raise (safeio's checks, the init file, the regulator read from it)
class ArtefactError(GramPluginError, ValueError):
    """A file gram-plugin reads is missing, damaged, of another kind, or does not fit."""


class PromptInitError(ArtefactError):
    """An init artefact does not fit: unreadable file, or names / shapes / dtypes / backbone differ."""


__all__ = ["GramPluginError", "ArtefactError", "PromptInitError"]
