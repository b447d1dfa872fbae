"""What a meta-learning task is, and the interface task sources implement.

A task is a support batch (what the inner loop adapts on) and a query batch (what the adapted
prompt is judged on). A batch is whatever the model's ``loss(params, batch)`` accepts; the core never
looks inside. Task sources draw tasks from a ``torch.Generator`` the trainer owns, so a run is
reproducible from its seed and resumable from the generator's saved state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Task:
    """One task: the ``support`` batch the inner loop adapts on, the ``query`` batch it is judged on, and ``info``."""

    support: Any
    query: Any
    info: dict = field(default_factory=dict)  # e.g. class names, source dataset, topic ids


@runtime_checkable
class TaskSource(Protocol):
    """Anything that draws tasks; optionally ``describe() -> dict`` for the init's metadata."""

    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task. All randomness must come from ``generator``."""
        ...


class FixedTasks:
    """A task source cycling through a fixed list (tests, and evaluation on held-out tasks)."""

    def __init__(self, tasks: list[Task]):
        if not tasks:
            raise ValueError("FixedTasks needs at least one task")
        self.tasks = list(tasks)

    def sample(self, generator: torch.Generator) -> Task:
        """One of the tasks, drawn with ``generator``."""
        i = int(torch.randint(len(self.tasks), (1,), generator=generator))
        return self.tasks[i]

    def describe(self) -> dict:
        """The source for an init's metadata."""
        return {"kind": "fixed", "n_tasks": len(self.tasks)}
