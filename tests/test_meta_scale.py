"""Class chunking and inner-step checkpointing (gram_plugin.scale) give the same values and the same
first- and second-order gradients as the plain computation: gradgradcheck against finite
differences, float64 meta-gradients against the unchunked trainer, and a tiny open_clip CLIP."""

from collections import OrderedDict

import pytest
import torch

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, Task
from fixtures.meta_problem import small_loss
from gram_plugin.scale import checkpointed_grad, chunked_rows, class_chunking

DT = torch.float64


def row_fn_factory(seed=0, width=5):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(width, 7, generator=g, dtype=DT), torch.randn(7, 3, generator=g, dtype=DT)

    def fn(x, ids):
        # nonlinear per row, uses the integer row argument like the text tower's EOT index
        h = torch.tanh(x @ w1) * (1 + ids.to(DT).unsqueeze(-1) / 10)
        return torch.sin(h @ w2)

    return fn


@pytest.mark.parametrize("chunk", [1, 2, 4, 10])
def test_chunked_rows_values_and_double_backward_match(chunk):
    fn = row_fn_factory()
    x = torch.randn(7, 5, dtype=DT, requires_grad=True)
    ids = torch.arange(7)
    ref = fn(x, ids)
    out = chunked_rows(fn, x, ids, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    v = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * v).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad((out * v).sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    # second order: d/dx of a function of the gradient (what the MAML meta-backward does)
    (h_ref,) = torch.autograd.grad((g_ref**2).sum() + (g_ref * x).sum(), x)
    (h,) = torch.autograd.grad((g**2).sum() + (g * x).sum(), x)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def test_chunked_rows_gradgradcheck():
    fn = row_fn_factory(seed=1)
    ids = torch.arange(5)
    x = torch.randn(5, 5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: chunked_rows(fn, t, ids, chunk_size=2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: chunked_rows(fn, t, ids, chunk_size=2), (x,))


def test_chunked_rows_rejects_bad_input():
    fn = row_fn_factory()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_rows(fn, torch.zeros(3, 5, dtype=DT), torch.arange(3), chunk_size=0)
    with pytest.raises(ValueError, match="rows"):
        chunked_rows(fn, torch.zeros(3, 5, dtype=DT), torch.arange(4), chunk_size=2)


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = OrderedDict(ctx=torch.randn(3, 4, generator=g, dtype=DT), vpt=0.3 * torch.randn(3, 4, generator=g, dtype=DT),
                         unused=torch.randn(2, 4, generator=g, dtype=DT))
    xs, ys = torch.randn(8, 4, generator=g, dtype=DT), torch.randint(3, (8,), generator=g)
    xq, yq = torch.randn(10, 4, generator=g, dtype=DT), torch.randint(3, (10,), generator=g)
    reg = GradientRegulator({"ctx": (3, 4), "vpt": (3, 4)}, init_gain=0.8).double()
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=DT))
    return params, Task((xs, ys), (xq, yq)), reg


def meta_grads(checkpoint_inner, k=3, first_order=False):
    params, task, reg = make_problem()
    cfg = MetaConfig(inner_lr=0.3, inner_steps=k, first_order=first_order, checkpoint_inner=checkpoint_inner, progress=False)
    tr = MetaPromptTrainer(small_loss, params, regulator=reg, config=cfg)
    out = tr.task_losses(task)
    out["query_loss"].backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in tr.params.items()}
    grads.update({f"phi.{n}": p.grad.clone() for n, p in reg.named_parameters()})
    return out["query_loss"].detach(), out["support_loss"], grads


@pytest.mark.parametrize("k", [1, 3])
def test_checkpoint_inner_gives_the_same_meta_gradients(k):
    loss_ref, sup_ref, ref = meta_grads(False, k)
    loss, sup, got = meta_grads(True, k)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(sup, sup_ref, rtol=1e-14, atol=0)
    assert got.keys() == ref.keys()
    assert ref["unused"] is None and got["unused"] is None  # an unused prompt stays untouched
    for n in ref:
        if ref[n] is not None:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_checkpointed_grad_equals_autograd_grad_and_its_hessian():
    params, task, _ = make_problem(seed=3)
    xs = {n: t.clone().requires_grad_() for n, t in params.items()}
    loss, grads = checkpointed_grad(small_loss, xs, task.support)
    ref_loss = small_loss(xs, task.support)
    ref = torch.autograd.grad(ref_loss, list(xs.values()), create_graph=True, allow_unused=True)
    torch.testing.assert_close(loss, ref_loss.detach())
    obj = (grads["ctx"] ** 2).sum() + (grads["vpt"] * xs["vpt"]).sum() + 0.5 * loss
    obj_ref = (ref[0] ** 2).sum() + (ref[1] * xs["vpt"]).sum() + 0.5 * ref_loss
    h = torch.autograd.grad(obj, [xs["ctx"], xs["vpt"]])
    h_ref = torch.autograd.grad(obj_ref, [xs["ctx"], xs["vpt"]])
    for a, b in zip(h, h_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- a tiny open_clip CLIP through PromptedCLIP (the real text-tower path) ----------------------

def _tiny_prompted():
    from conftest import make_tiny_clip

    from gram_plugin.backbones import OpenCLIPBackbone
    from gram_plugin.models import PromptedCLIP

    bb = OpenCLIPBackbone(make_tiny_clip(seed=4))
    # float64 tower: chunked and unchunked then agree to ~1e-13 (float32 noise, amplified by the
    # second-order terms, would hide a wrong term behind a loose tolerance)
    return PromptedCLIP(bb, "coop", n_ctx=2, ctx_init=None, seed=1).double()


def _clip_task(model, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["cat", "dog", "red fox", "sports car", "coffee mug", "violin", "pizza"][:n_classes]

    def batch(n):
        return {"features": torch.randn(n, model.backbone.embed_dim, generator=g),
                "labels": torch.arange(n) % n_classes, "classnames": names}

    return Task(batch(10), batch(10))


@pytest.mark.parametrize("checkpoint_inner", [False, True])
def test_class_chunking_on_prompted_clip_gives_the_same_second_order_meta_gradient(checkpoint_inner):
    model = _tiny_prompted()
    task = _clip_task(model)
    reg = GradientRegulator({"ctx": tuple(model.ctx.shape)}).double()

    def grads(chunk):
        cfg = MetaConfig(inner_lr=0.5, inner_steps=2, checkpoint_inner=checkpoint_inner and chunk is not None,
                         progress=False)
        tr = MetaPromptTrainer(model.meta_loss_fn(), model, regulator=reg, config=cfg)
        model.ctx.grad = None
        reg.zero_grad(set_to_none=True)
        if chunk is None:
            out = tr.task_losses(task)
            out["query_loss"].backward()
        else:
            with class_chunking(model.backbone, chunk):
                out = tr.task_losses(task)
                out["query_loss"].backward()
        return out["query_loss"].detach(), model.ctx.grad.clone(), [p.grad.clone() for p in reg.parameters()]

    q_ref, g_ref, phi_ref = grads(None)
    q, g, phi = grads(2)
    assert "encode_text_embeddings" not in vars(model.backbone)  # the context manager undid the patch
    torch.testing.assert_close(q, q_ref, rtol=1e-10, atol=1e-12)
    assert g_ref.abs().max() > 1e-3
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(phi, phi_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
