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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from .metastep import MetaStep, TaskLoss, double_backward_attention, nonfinite_names
from .tasks import Task


def supports_batching(loss_fn) -> bool:
    """Whether ``loss_fn`` has a ``batched`` form (``PromptedCLIP.meta_loss_fn`` in CoOp mode) that runs several tasks at once."""
    return callable(getattr(loss_fn, "batched", None))


class BatchedMetaStep(MetaStep):
    """:class:`~gram_plugin.metastep.MetaStep` whose ``task_losses`` runs a group of tasks through
    one batched forward per inner step (``tasks_per_backward`` tasks a group).

    Falls back to the per-task loop where batching does not apply: a loss function without
    ``batched``, ``checkpoint_inner`` (its recomputation is per task) and ``track_alignment``.
    """

    def task_losses(self, params: Mapping[str, torch.Tensor], tasks: Sequence[Task]) -> list[TaskLoss]:
        """The query losses of ``tasks`` after adaptation, the group run through one batched forward per inner step;
        falls back to :meth:`MetaStep.task_losses` (one task at a time) where batching does not apply."""
        if len(tasks) < 2 or not supports_batching(self.loss_fn) or self.checkpoint_inner or self.track_alignment:
            return super().task_losses(params, tasks)
        batched = self.loss_fn.batched
        create_graph = not self.first_order
        n = len(tasks)
        # a distinct view of theta per task, so that one autograd.grad returns per-task gradients
        fasts = [OrderedDict((name, p.view_as(p)) for name, p in params.items()) for _ in range(n)]
        outs = [TaskLoss(None) for _ in range(n)]
        with double_backward_attention(create_graph):
            for j in range(self.inner_steps):
                losses = batched(fasts, [t.support for t in tasks])
                inputs = [p for fast in fasts for p in fast.values()]
                flat = torch.autograd.grad(sum(losses), inputs, create_graph=create_graph, allow_unused=True)
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
        # The query losses are differentiated once only, so they may use the fused attention kernels.
        for out, loss in zip(outs, batched(fasts, [t.query for t in tasks])):
            out.query_loss = loss
        return outs

