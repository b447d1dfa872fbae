"""The meta-step: inner adaptation and the outer (meta-)gradient, nothing else.

For each task t of a meta-batch (support S_t, query Q_t), starting from the shared prompt theta::

    theta'_0 = theta
    theta'_{j+1} = theta'_j - alpha * R_phi(grad L(theta'_j, S_t))        j = 0..k-1
    meta-loss = mean_t L(theta'_k, Q_t)

:class:`MetaStep` computes theta'_k (:meth:`~MetaStep.adapt`), the query losses of a list of tasks
(:meth:`~MetaStep.task_losses`) and accumulates d meta-loss / d(theta, phi) into ``.grad``
(:meth:`~MetaStep.accumulate_gradients`). It holds no optimiser, writes no file, and reports a
non-finite value as a return value (``nonfinite``: the reason) instead of raising: what to do about
it (stop, skip the step) is the run loop's decision (:mod:`gram_plugin.meta`).

``first_order`` detaches the inner gradients (FOMAML) but keeps R_phi in the graph, so the regulator
still learns. Without a regulator this is plain MAML. The inner loop is written with
``torch.autograd.grad`` on the prompt tensors, so any model works whose loss can be written as
``loss_fn(params, batch)``; :func:`module_loss` builds one for an ``nn.Module`` with marked prompts.

Batching seam: :meth:`~MetaStep.accumulate_gradients` hands ``tasks_per_backward`` tasks at a time
to :meth:`~MetaStep.task_losses` and runs one backward on their summed query losses. The default
(one task, one backward) frees each task's graph before the next is built; a subclass may run a
group of tasks through one batched forward by overriding :meth:`~MetaStep.task_losses`.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .marking import LossFn, module_loss  # noqa: F401 (module_loss re-exported)
from .regulator import GradientRegulator
from .scale import checkpointed_grad
from .tasks import Task

Grads = Mapping[str, "torch.Tensor | None"]


def nonfinite_names(grads: Grads) -> list[str]:
    """Names whose gradient holds a NaN or an infinity (``None`` gradients are fine)."""
    return [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]


def cosine(a: Grads, b: Grads) -> float:
    """Cosine between two gradient maps over the names both have (nan if either is zero)."""
    num, na, nb = 0.0, 0.0, 0.0
    for n, x in a.items():
        y = b.get(n)
        if x is None or y is None:
            continue
        x, y = x.detach().double(), y.detach().double()
        num += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    return num / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


def _detached(grads: Grads) -> dict:
    return {n: (None if g is None else g.detach()) for n, g in grads.items()}


def double_backward_attention(create_graph: bool):
    """Fused attention kernels have no double backward; the math kernel does."""
    if not create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@dataclass
class Adaptation:
    """Result of :meth:`MetaStep.adapt`: fast weights and what the first inner step saw."""

    fast: "OrderedDict[str, torch.Tensor]"
    support_loss: torch.Tensor | None = None  # first inner step, detached
    support_grads: dict | None = None  # first inner step, raw, detached
    regulated_grads: dict | None = None  # first inner step after R_phi, detached
    nonfinite: str | None = None  # why adaptation stopped early; None when every step was finite


@dataclass
class TaskLoss:
    """One task's adapted query loss (in the graph) and diagnostics."""

    query_loss: torch.Tensor | None
    support_loss: torch.Tensor | None = None
    align_raw: float | None = None
    align_regulated: float | None = None
    nonfinite: str | None = None


@dataclass
class StepStats:
    """Sums over the tasks :meth:`MetaStep.accumulate_gradients` ran (divide by the meta-batch size)."""

    meta_loss: float = 0.0
    support_loss: float = 0.0
    align_raw: float = 0.0
    align_regulated: float = 0.0
    tasks: int = 0
    nonfinite: str | None = None


class MetaStep:
    """Inner adaptation + outer gradient of (regulated) MAML on prompt tensors.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        regulator: GRAM's ``GradientRegulator`` R_phi applied to every inner gradient, or ``None``.
        inner_lr: alpha. inner_steps: k. first_order: FOMAML.
        checkpoint_inner: ``True``: keep no inner-step graph; the meta-backward recomputes each step
            (second order only; see :mod:`gram_plugin.scale`). ``"auto"``: only where the tasks of a
            group are batched (:mod:`gram_plugin.metabatch`): keep one inner step's graph per task, recompute
            the others; the per-task loop keeps its graphs. ``False``: keep every graph.
        track_alignment: also report cos(support grad, query grad) at theta, raw and regulated
            (GRAM Fig. 3b); costs one more query backward per task.
        tasks_per_backward: tasks whose query losses share one backward (see the module docstring).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        regulator: GradientRegulator | None = None,
        inner_lr: float = 0.025 / 6,
        inner_steps: int = 4,
        first_order: bool = False,
        checkpoint_inner: "bool | str" = False,
        track_alignment: bool = False,
        tasks_per_backward: int = 1,
    ):
        self.loss_fn = loss_fn
        self.regulator = regulator
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        if checkpoint_inner not in (False, True, "auto"):
            raise ValueError(f"checkpoint_inner must be False, True or 'auto', got {checkpoint_inner!r}")
        self.checkpoint_inner = checkpoint_inner
        self.track_alignment = track_alignment
        self.tasks_per_backward = tasks_per_backward

    def _support_grads(self, fast, support, create_graph: bool):
        if create_graph and self.checkpoint_inner is True:  # "auto" keeps the per-task loop's graphs
            loss, grads = checkpointed_grad(self.loss_fn, fast, support)
            return loss, OrderedDict((n, grads[n]) for n in fast)
        loss = self.loss_fn(fast, support)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph, allow_unused=True)
        return loss, OrderedDict(zip(fast.keys(), grads))

    def adapt(
        self,
        params: Mapping[str, torch.Tensor],
        support: Any,
        steps: int | None = None,
        create_graph: bool | None = None,
    ) -> Adaptation:
        """k regulated inner steps from ``params`` on ``support``.

        ``create_graph`` defaults to ``not first_order``. With a regulator the fast weights are
        always differentiable in phi. Stops at the first non-finite support loss or gradient and
        says so in ``nonfinite``.
        """
        steps = self.inner_steps if steps is None else steps
        create_graph = (not self.first_order) if create_graph is None else create_graph
        out = Adaptation(OrderedDict(params))
        for j in range(steps):
            loss, grads = self._support_grads(out.fast, support, create_graph)
            bad = nonfinite_names(grads)
            if bad or not bool(torch.isfinite(loss)):
                out.nonfinite = f"inner step {j}: non-finite support loss/gradient in {bad or 'loss'}"
                return out
            if j == 0:
                out.support_loss, out.support_grads = loss.detach(), _detached(grads)
            if self.regulator is not None:
                grads = self.regulator.regulate(grads)
                if j == 0:
                    out.regulated_grads = _detached(grads)
            out.fast = OrderedDict(
                (n, p if grads[n] is None else p - self.inner_lr * grads[n]) for n, p in out.fast.items()
            )
        return out

    def task_loss(self, params: Mapping[str, torch.Tensor], task: Task) -> TaskLoss:
        """Adapt on the support set, then the query loss at the fast weights (in the graph)."""
        with double_backward_attention(not self.first_order):
            adapted = self.adapt(params, task.support)
        if adapted.nonfinite is not None:
            return TaskLoss(None, nonfinite=adapted.nonfinite)
        # The query loss is differentiated once only, so it may use the fused attention kernels.
        out = TaskLoss(self.loss_fn(adapted.fast, task.query), support_loss=adapted.support_loss)
        if self.track_alignment:
            q = self.loss_fn(params, task.query)
            gq = dict(zip(params.keys(), torch.autograd.grad(q, list(params.values()), allow_unused=True)))
            out.align_raw = cosine(adapted.support_grads, gq)
            if adapted.regulated_grads is not None:
                out.align_regulated = cosine(adapted.regulated_grads, gq)
        return out

    def task_losses(self, params: Mapping[str, torch.Tensor], tasks: Sequence[Task]) -> list[TaskLoss]:
        """One :class:`TaskLoss` per task. The seam for a batched forward over a group of tasks."""
        return [self.task_loss(params, t) for t in tasks]

    def meta_parameters(self, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """What the outer step updates: the prompt tensors ``params`` and, with one, the regulator's parameters."""
        return list(params.values()) + (list(self.regulator.parameters()) if self.regulator is not None else [])

    def accumulate_gradients(
        self, params: Mapping[str, torch.Tensor], tasks: Sequence[Task], scale: float = 1.0,
        on_tasks_done: Callable[[int], None] | None = None,
    ) -> StepStats:
        """Add ``scale`` * d(sum of query losses)/d(theta, phi) to ``.grad``; return the summed diagnostics.

        Stops at the first task whose adaptation was non-finite (``stats.nonfinite`` names it); the
        caller then discards the gradients. A non-finite query loss is left for the caller to see in
        ``stats.meta_loss`` and the gradients. ``on_tasks_done(k)`` is called after each backward
        with the number of tasks it covered (progress within a long outer step).
        """
        stats = StepStats()
        group = max(1, int(self.tasks_per_backward))
        for start in range(0, len(tasks), group):
            outs = self.task_losses(params, tasks[start : start + group])
            for i, out in enumerate(outs):
                if out.nonfinite is not None:
                    stats.nonfinite = f"task {start + i}: {out.nonfinite}"
                    return stats
            (sum(o.query_loss for o in outs) * scale).backward()
            if on_tasks_done is not None:
                on_tasks_done(len(outs))
            for o in outs:
                stats.tasks += 1
                stats.meta_loss += float(o.query_loss.detach())
                stats.support_loss += float(o.support_loss) if o.support_loss is not None else 0.0
                stats.align_raw += o.align_raw or 0.0
                stats.align_regulated += o.align_regulated or 0.0
        return stats

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], tasks: Sequence[Task], steps: int | None = None) -> dict:
        """Mean query loss before and after adaptation (no meta-update; nan if adaptation was non-finite)."""
        pre, post = [], []
        for task in tasks:
            pre.append(float(self.loss_fn(params, task.query)))
            with torch.enable_grad():
                adapted = self.adapt(params, task.support, steps=steps, create_graph=False)
            fast = {n: t.detach() for n, t in adapted.fast.items()}
            post.append(float("nan") if adapted.nonfinite else float(self.loss_fn(fast, task.query)))
        return {"query_loss_before": sum(pre) / len(pre), "query_loss_after": sum(post) / len(post)}
