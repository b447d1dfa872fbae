"""What the config dataclasses share: one error that lists every problem, and small field checks.

Each config (``MetaConfig``, ``TuneConfig``, ``PromptConfig``, the CLI's ``DataConfig``) checks its
own fields in ``__post_init__`` and raises one :class:`ConfigError` listing all its problems;
:func:`build_all` builds several at once and reports the problems of all of them together, so a
command line with three bad numbers gets one message naming the three.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .errors import GramPluginError


class ConfigError(GramPluginError, ValueError):
    """Invalid settings; ``problems`` lists each one."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


def positive_number(name: str, v: Any) -> list[str]:
    """``[]``, or the problem when ``v`` is not a finite number > 0 (``name`` names the field)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return [] if ok else [f"{name} must be a finite number > 0, got {v!r}"]


def integer_at_least(name: str, v: Any, low: int) -> list[str]:
    """``[]``, or the problem when ``v`` is not an integer >= ``low`` (booleans are not integers here)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
    return [] if ok else [f"{name} must be an integer >= {low}, got {v!r}"]


def seed_problems(name: str, v: Any) -> list[str]:
    """A random seed: a whole number torch, numpy and Python all take (``torch.manual_seed`` overflows past 2**64)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
    return [] if ok else [f"{name} must be an integer in [0, 2**63), got {v!r}"]


def one_of(name: str, v: Any, choices: tuple) -> list[str]:
    """``[]``, or the problem when ``v`` is not one of ``choices``."""
    return [] if v in choices else [f"{name} must be one of {list(choices)}, got {v!r}"]


def raise_problems(what: str, problems: list[str]) -> None:
    """Raise one :class:`ConfigError` for ``what`` listing ``problems``, if there are any."""
    if problems:
        raise ConfigError(what, problems)


def build_all(**factories: Callable[[], Any]) -> dict[str, Any]:
    """Call every factory; if any raise :class:`ConfigError`, raise one listing all their problems."""
    built, problems = {}, []
    for key, make in factories.items():
        try:
            built[key] = make()
        except ConfigError as e:
            problems += e.problems
    raise_problems("options", problems)
    return built
