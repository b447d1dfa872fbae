"""Meta-gradients of theta (prompt init) and phi (regulator) against independent references.

Reference (a): central finite differences of the meta-loss in float64 (second order; for first
order, of the stop-gradient objective with the inner gradients frozen at their computed values).
Reference (b): the same bi-level step written with ``higher`` (differentiable SGD whose
``grad_callback`` applies the regulator).
"""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task
from fixtures.meta_problem import small_loss

higher = pytest.importorskip("higher")

DT = torch.float64


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = OrderedDict(ctx=torch.randn(3, 4, generator=g, dtype=DT), vpt=0.3 * torch.randn(3, 4, generator=g, dtype=DT))
    xs, ys = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(3, (8,), generator=g)
    xq, yq = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(3, (10,), generator=g)
    task = Task((xs, ys), (xq, yq))
    reg = GradientRegulator({n: p.shape for n, p in params.items()}, init_gain=0.8).double()
    with torch.no_grad():  # move away from the W=0 start so every phi entry matters
        for p in reg.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=DT))
    return params, task, reg


def trainer_grads(params, task, reg, k, first_order, alpha=0.3):
    cfg = MetaConfig(inner_lr=alpha, inner_steps=k, first_order=first_order, progress=False)
    tr = MetaPromptTrainer(small_loss, params, regulator=reg, config=cfg)
    out = tr.task_losses(task)
    out["query_loss"].backward()
    g_theta = {n: p.grad.clone() for n, p in tr.params.items()}
    g_phi = {n: p.grad.clone() for n, p in reg.named_parameters()}
    reg.zero_grad(set_to_none=True)
    return out["query_loss"].detach(), g_theta, g_phi


def meta_loss(theta, reg, task, k, alpha=0.3):
    fast = dict(theta)
    for _ in range(k):
        loss = small_loss(fast, task.support)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: p - alpha * reg(n, g) for (n, p), g in zip(fast.items(), grads)}
    return small_loss(fast, task.query)


def central_fd(fn, tensors, eps=1e-6):
    """d fn / d tensor for every entry of every tensor (they are perturbed in place)."""
    out = []
    for t in tensors:
        g = torch.zeros_like(t)
        flat, gf = t.data.view(-1), g.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = float(fn().detach())
            flat[i] = old - eps
            down = float(fn().detach())
            flat[i] = old
            gf[i] = (up - down) / (2 * eps)
        out.append(g)
    return out


class Prompted(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.ctx = nn.Parameter(params["ctx"].clone())
        self.vpt = nn.Parameter(params["vpt"].clone())

    def forward(self, x):
        return torch.tanh(x @ self.ctx.t()) + (x**2) @ self.vpt.t()


def higher_grads(params, task, reg, k, first_order, alpha=0.3):
    model = Prompted(params)
    names = ["ctx", "vpt"]
    opt = torch.optim.SGD(model.parameters(), lr=alpha)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=not first_order) as (fm, dopt):
        for _ in range(k):
            loss = F.cross_entropy(fm(task.support[0]), task.support[1])
            dopt.step(loss, grad_callback=lambda gs: [reg(n, g) for n, g in zip(names, gs)])
        q = F.cross_entropy(fm(task.query[0]), task.query[1])
        if first_order:
            # FOMAML: the theta meta-gradient is the query gradient at the adapted weights
            gq = torch.autograd.grad(q, list(fm.parameters()))
            return q.detach(), dict(zip(names, gq))
        q.backward()
    return q.detach(), {"ctx": model.ctx.grad, "vpt": model.vpt.grad}


@pytest.mark.parametrize("k", [1, 3])
def test_second_order_matches_finite_differences_and_higher(k):
    params, task, reg = make_problem()
    loss, g_theta, g_phi = trainer_grads(params, task, reg, k, first_order=False)

    theta = {n: t.clone().requires_grad_() for n, t in params.items()}
    fd_theta = central_fd(lambda: meta_loss(theta, reg, task, k), list(theta.values()))
    for (n, _), fd in zip(theta.items(), fd_theta):
        torch.testing.assert_close(g_theta[n], fd, rtol=1e-6, atol=1e-8)
    named_phi = list(reg.named_parameters())
    fd_phi = central_fd(lambda: meta_loss(theta, reg, task, k), [p for _, p in named_phi])
    for (n, _), fd in zip(named_phi, fd_phi):
        torch.testing.assert_close(g_phi[n], fd, rtol=1e-6, atol=1e-8)

    q_ref, g_ref = higher_grads(params, task, reg, k, first_order=False)
    torch.testing.assert_close(loss, q_ref)
    for n in g_theta:
        torch.testing.assert_close(g_theta[n], g_ref[n], rtol=1e-10, atol=1e-12)
    reg.zero_grad(set_to_none=True)
    # higher's phi gradient: backward of the same query loss reached the regulator too
    params2, task2, reg2 = make_problem()
    model = Prompted(params2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fm, dopt):
        for _ in range(k):
            loss = F.cross_entropy(fm(task2.support[0]), task2.support[1])
            dopt.step(loss, grad_callback=lambda gs: [reg2(n, g) for n, g in zip(["ctx", "vpt"], gs)])
        F.cross_entropy(fm(task2.query[0]), task2.query[1]).backward()
    for n, p in reg2.named_parameters():
        torch.testing.assert_close(g_phi[n], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_first_order_matches_higher_and_frozen_gradient_finite_differences(k):
    params, task, reg = make_problem(seed=1)
    alpha = 0.3
    loss, g_theta, g_phi = trainer_grads(params, task, reg, k, first_order=True, alpha=alpha)

    q_ref, g_ref = higher_grads(params, task, reg, k, first_order=True, alpha=alpha)
    torch.testing.assert_close(loss, q_ref)
    for n in g_theta:
        torch.testing.assert_close(g_theta[n], g_ref[n], rtol=1e-10, atol=1e-12)

    # First order still trains the regulator: fast = theta - alpha * sum_j R(g_j) with every g_j
    # frozen. Recompute the g_j, then finite-difference that objective in phi.
    with torch.no_grad():
        fast = {n: t.clone() for n, t in params.items()}
        frozen = []
        for _ in range(k):
            with torch.enable_grad():
                f = {n: t.clone().requires_grad_() for n, t in fast.items()}
                gs = torch.autograd.grad(small_loss(f, task.support), list(f.values()))
            frozen.append(dict(zip(f.keys(), gs)))
            fast = {n: fast[n] - alpha * reg(n, frozen[-1][n]) for n in fast}

    def frozen_objective():
        f = {n: t.clone() for n, t in params.items()}
        for gs in frozen:
            f = {n: f[n] - alpha * reg(n, gs[n]) for n in f}
        return small_loss(f, task.query)

    named_phi = list(reg.named_parameters())
    fd_phi = central_fd(frozen_objective, [p for _, p in named_phi])
    for (n, _), fd in zip(named_phi, fd_phi):
        torch.testing.assert_close(g_phi[n], fd, rtol=1e-6, atol=1e-8)
    assert any(g.abs().max() > 1e-6 for g in g_phi.values())


def test_first_and_second_order_differ_when_k_gt_0():
    params, task, reg = make_problem(seed=2)
    _, g2, _ = trainer_grads(params, task, reg, 2, first_order=False)
    _, g1, _ = trainer_grads(params, task, reg, 2, first_order=True)
    assert not torch.allclose(g2["ctx"], g1["ctx"])


def test_module_loss_functional_call_matches_dict_loss():
    from gram_plugin import mark_prompts, module_loss

    params, task, _ = make_problem()
    model = Prompted(params)
    mark_prompts(model, names=["ctx", "vpt"])
    fn = module_loss(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    shifted = {n: t + 0.1 for n, t in params.items()}
    torch.testing.assert_close(fn(shifted, task.query), small_loss(shifted, task.query))
    # the module's own parameters are untouched by the functional call
    torch.testing.assert_close(model.ctx.detach(), params["ctx"])
