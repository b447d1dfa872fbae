"""The meta-step alone (no optimiser, no run loop): gradients, grouping, non-finite as a value."""

from collections import OrderedDict

import torch

from gram_plugin import GradientRegulator, Task
from gram_plugin.metastep import MetaStep

DT = torch.float64


def small_loss(params, batch):
    x, y = batch
    logits = x @ (params["ctx"] + params["vpt"]).t()
    return torch.nn.functional.cross_entropy(logits, y)


def problem(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = OrderedDict((n, torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()) for n in ("ctx", "vpt"))
    tasks = []
    for _ in range(n_tasks):
        xs, ys = torch.randn(6, 4, generator=g, dtype=DT), torch.randint(3, (6,), generator=g)
        xq, yq = torch.randn(6, 4, generator=g, dtype=DT), torch.randint(3, (6,), generator=g)
        tasks.append(Task((xs, ys), (xq, yq)))
    reg = GradientRegulator({n: (3, 4) for n in params}, init_gain=0.7).double()
    return params, tasks, reg


def by_hand(params, tasks, reg, alpha, k):
    """mean_t L(theta'_k, Q_t), written out."""
    total = 0.0
    for t in tasks:
        fast = dict(params)
        for _ in range(k):
            grads = torch.autograd.grad(small_loss(fast, t.support), list(fast.values()), create_graph=True)
            fast = {n: p - alpha * reg(n, g) for (n, p), g in zip(fast.items(), grads)}
        total = total + small_loss(fast, t.query)
    return total / len(tasks)


def grads_of(params, reg):
    out = {n: p.grad.clone() for n, p in params.items()}
    out.update({f"phi.{n}": p.grad.clone() for n, p in reg.named_parameters()})
    for p in [*params.values(), *reg.parameters()]:
        p.grad = None
    return out


def test_accumulated_gradients_equal_the_hand_written_meta_loss_and_grouping_changes_nothing():
    params, tasks, reg = problem()
    by_hand(params, tasks, reg, 0.3, 2).backward()
    ref = grads_of(params, reg)
    for group in (1, 2, 3):
        step = MetaStep(small_loss, reg, inner_lr=0.3, inner_steps=2, tasks_per_backward=group)
        stats = step.accumulate_gradients(params, tasks, scale=1 / len(tasks))
        assert stats.nonfinite is None and stats.tasks == 3
        got = grads_of(params, reg)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14, msg=f"{n}, group {group}")
    expected = float(by_hand(params, tasks, reg, 0.3, 2).detach()) * 3
    assert abs(stats.meta_loss - expected) < 1e-12


def test_a_nonfinite_support_gradient_is_returned_not_raised_and_no_gradient_is_written():
    params, tasks, reg = problem()
    bad = Task((tasks[1].support[0] * float("nan"), tasks[1].support[1]), tasks[1].query)
    step = MetaStep(small_loss, reg, inner_lr=0.3, inner_steps=2)
    adapted = step.adapt(params, bad.support)
    assert adapted.nonfinite == "inner step 0: non-finite support loss/gradient in ['ctx', 'vpt']"
    stats = step.accumulate_gradients(params, [bad, tasks[0]], scale=0.5)
    assert stats.nonfinite.startswith("task 0: inner step 0") and stats.tasks == 0
    assert all(p.grad is None for p in [*params.values(), *reg.parameters()])


def test_evaluate_reports_adaptation_lowering_the_query_loss_on_a_fitting_task():
    params, tasks, _ = problem(1)
    t = Task(tasks[0].support, tasks[0].support)  # query = support: k steps of descent must lower it
    out = MetaStep(small_loss, None, inner_lr=0.5, inner_steps=3).evaluate(params, [t])
    assert out["query_loss_after"] < out["query_loss_before"]
