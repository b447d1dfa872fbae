"""The tasks of a meta-batch through one forward: :class:`BatchedMetaStep`.

After end-of-text truncation the text tower's matrix products have only classes x ~9 rows per task,
far below what the CPU (or GPU) needs to run near its peak, and every one of its ~30 operations per
layer pays its fixed cost once per task and inner step. :class:`BatchedMetaStep` runs the inner
steps and the query losses of a group of tasks together: at inner step j every task t has its own
fast weights theta'_{t,j}; one call of the loss function's ``batched`` form computes all the tasks'
losses (for :class:`~gram_plugin.models.PromptedCLIP`: one text-tower forward over the stacked
class prompts, task t's rows built from its own context vectors), and one ``autograd.grad`` of their
sum gives every task its own gradient (task t's loss depends only on theta'_{t,j}). The arithmetic
is the per-task loop's (tests/test_metabatch.py: values and second-order meta-gradients in float64);
the memory is that of the whole group's graphs at once instead of one task's.

A loss function can be batched if it has an attribute ``batched``:
``loss_fn.batched(params_list, batches) -> list of scalar losses`` (one per task, same order), with
the same value as ``[loss_fn(p, b) for p, b in zip(params_list, batches)]``.

Memory (``checkpoint_inner="auto"``, MetaConfig's default): the group's graphs grow with the inner
steps k, the tasks and their classes, so the step measures the graph its first inner step keeps (the
bytes autograd saves for backward) and keeps the graphs of as many inner steps as fit in
:data:`GRAPH_BUDGET` x the weight memory of the model the loss function runs (``loss_fn.module``, set by
:func:`~gram_plugin.metastep.module_loss`), at least one: the last ones; the earlier steps are
recomputed in the meta-backward (:func:`~gram_plugin.scale.checkpointed_grad`, exact), after the kept
graphs are freed, so the peak stays that of the kept graphs. When steps are recomputed, the first one
runs twice (once measured, once checkpointed). Where the model is unknown, every graph is kept. The
choice and its figures: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from .metastep import MetaStep, TaskLoss, double_backward_attention, nonfinite_names
from .scale import checkpointed_grad
from .tasks import Task


# "auto" keeps inner-step graphs up to this fraction of the model's weight memory (``higher`` holds
# about twice the model's weights: benchmarks/README.md, "Meta-step memory")
GRAPH_BUDGET = 0.5


def supports_batching(loss_fn) -> bool:
    """Whether ``loss_fn`` has a ``batched`` form (``PromptedCLIP.meta_loss_fn`` in CoOp mode) that runs several tasks at once."""
    return callable(getattr(loss_fn, "batched", None))


def weight_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (each storage once)."""
    storages = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


class SavedBytes:
    """``torch.autograd.graph.saved_tensors_hooks`` that add up the storages autograd saves for backward
    and still holds (each storage once). Tensors that need no gradient (frozen weights, the input batch)
    are not counted: they live on without the graph. Nested counters all count (autograd applies only the
    innermost hooks)."""

    _active: list["SavedBytes"] = []

    def __init__(self):
        self.refs: list = []  # weak references to the saved tensors

    def pack(self, t):
        if not t.requires_grad:
            return t
        # a detached alias (same storage): autograd re-attaches the history on unpacking, and the graph
        # then holds no reference to a tensor whose grad_fn holds the graph (a cycle that is never freed)
        alias = t.detach()
        for counter in SavedBytes._active:
            counter.refs.append(weakref.ref(alias))
        return alias

    @staticmethod
    def unpack(t):
        return t

    @property
    def alive(self) -> int:
        """Bytes of the storages of the saved tensors a graph still holds now (deduplicated now: a freed
        storage's address may be reused by a later one)."""
        storages = {}
        for r in self.refs:
            t = r()
            if t is not None:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())

    @contextlib.contextmanager
    def hooks(self):
        SavedBytes._active.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield self
        finally:
            SavedBytes._active.remove(self)


class BatchedMetaStep(MetaStep):
    """:class:`~gram_plugin.metastep.MetaStep` whose ``task_losses`` runs a group of tasks through
    one batched forward per inner step (``tasks_per_backward`` tasks a group).

    Falls back to the per-task loop where batching does not apply: a loss function without
    ``batched``, and ``track_alignment``. ``checkpoint_inner``: ``True`` recomputes every inner step,
    ``"auto"`` keeps as many steps' graphs as the memory budget allows (module docstring).
    """

    last_kept_steps: int | None = None  # inner steps whose graph the last group kept (benchmarks, tests)


    def kept_steps(self, step_graph_bytes: int) -> int:
        """How many inner steps keep their graph under ``checkpoint_inner="auto"``, given the bytes the
        first step's graph holds for the whole group (the others are recomputed in the meta-backward)."""
        module = getattr(self.loss_fn, "module", None)
        if module is None or step_graph_bytes <= 0:
            return self.inner_steps
        budget = GRAPH_BUDGET * weight_bytes(module)
        return max(1, min(self.inner_steps, int(budget // step_graph_bytes)))

    def _group_grads(self, fasts, batches, checkpoint: bool, create_graph: bool):
        """Every task's support loss at its fast weights and the gradients of their sum (task by task,
        flattened), through one batched forward; ``checkpoint``: without keeping the graph."""
        inputs = [p for fast in fasts for p in fast.values()]
        if not checkpoint:
            losses = self.loss_fn.batched(fasts, batches)
            return losses, torch.autograd.grad(sum(losses), inputs, create_graph=create_graph, allow_unused=True)
        names, n_tasks, batched = list(fasts[0]), len(fasts), self.loss_fn.batched
        keys = [(t, name) for t in range(n_tasks) for name in names]

        def stacked_losses(flat, batches):  # kept by the graph: it must not hold the fast weights (a cycle)
            return torch.stack(list(batched([OrderedDict((name, flat[(t, name)]) for name in names)
                                             for t in range(n_tasks)], batches)))

        losses, grads = checkpointed_grad(stacked_losses, OrderedDict(zip(keys, inputs)), batches)
        return list(losses.unbind(0)), [grads[key] for key in keys]

    def task_losses(self, params: Mapping[str, torch.Tensor], tasks: Sequence[Task]) -> list[TaskLoss]:
        """The query losses of ``tasks`` after adaptation, the group run through one batched forward per inner step;
        falls back to :meth:`MetaStep.task_losses` (one task at a time) where batching does not apply."""
        if len(tasks) < 2 or not supports_batching(self.loss_fn) or self.track_alignment:
            return super().task_losses(params, tasks)
        create_graph = not self.first_order
        k = self.inner_steps
        auto = create_graph and self.checkpoint_inner == "auto" and k > 1
        # the last `keep` inner steps keep their graph, the first k - keep are recomputed in the meta-backward:
        # the meta-backward frees the kept graphs (last steps first) before it recomputes an earlier step, so the
        # peak is that of `keep` graphs, not `keep` + one recomputation
        keep = 0 if (create_graph and self.checkpoint_inner is True) else k
        n = len(tasks)
        # a distinct view of theta per task, so that one autograd.grad returns per-task gradients
        fasts = [OrderedDict((name, p.view_as(p)) for name, p in params.items()) for _ in range(n)]
        outs = [TaskLoss(None) for _ in range(n)]
        with double_backward_attention(create_graph):
            for j in range(k):
                supports = [t.support for t in tasks]
                if auto and j == 0:  # measure the graph of one step of this group, then decide
                    saved = SavedBytes()
                    with saved.hooks():
                        losses, flat = self._group_grads(fasts, supports, False, create_graph)
                    keep = self.kept_steps(saved.alive)
                    if keep < k:  # step 0 is to be recomputed: drop the graph just measured, take it checkpointed
                        del losses, flat
                        losses, flat = self._group_grads(fasts, supports, True, create_graph)
                else:
                    losses, flat = self._group_grads(fasts, supports, j < k - keep, create_graph)
                width = len(params)
                stop = False
                for t, (fast, loss) in enumerate(zip(fasts, losses)):
                    grads = OrderedDict(zip(fast.keys(), flat[t * width:(t + 1) * width]))
                    bad = nonfinite_names(grads)
                    if bad or not bool(torch.isfinite(loss)):
                        outs[t].nonfinite = f"inner step {j}: non-finite support loss/gradient in {bad or 'loss'}"
                        stop = True
                        continue
                    if j == 0:
                        outs[t].support_loss = loss.detach()
                    if self.regulator is not None:
                        grads = self.regulator.regulate(grads)
                    fasts[t] = OrderedDict(
                        (name, p if grads[name] is None else p - self.inner_lr * grads[name]) for name, p in fast.items()
                    )
                if stop:  # the caller stops at the first task that says why
                    return outs
        self.last_kept_steps = keep if create_graph else 0
        # The query losses are differentiated once only, so they may use the fused attention kernels.
        for out, loss in zip(outs, self.loss_fn.batched(fasts, [t.query for t in tasks])):
            out.query_loss = loss
        return outs

