"""Memory for large meta-training tasks: class chunking and inner-step gradient checkpointing.

Second-order meta-training keeps, for every inner step, the forward activations of the support
loss *and* the graph of its backward pass until the meta-backward. For CoOp-style prompts the text
tower runs once per class, so that memory grows as classes x inner steps x text-tower activations
(1000 ImageNet classes x 77 tokens x 12 layers of width 512 per step). Two tools, usable together:

* :func:`chunked_rows` / :func:`class_chunking`: run a row-wise function (the text tower over class
  prompts) ``chunk_size`` rows at a time, keeping only its *inputs*. Backward and the double
  backward of second-order MAML recompute one chunk at a time, so activation memory is that of one
  chunk whatever the number of classes. Exact: same values and (second-order) gradients.
* ``MetaConfig(checkpoint_inner=True)`` (:func:`checkpointed_grad`): each inner step's gradient is
  computed without keeping its graph; the meta-backward recomputes the step's forward and backward
  and takes the Hessian-vector product, one step at a time. Memory no longer grows with k.
  ``checkpoint_inner="auto"`` (the default) does this only for the batched meta-step's inner steps
  beyond a memory budget (:mod:`gram_plugin.metabatch`).

Cost: recomputation (measured in benchmarks/README.md, bench_memory.py); class chunking and
``checkpoint_inner=True`` are off by default. Third-order gradients through these functions are not
supported (MAML needs second).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch.autograd.function import once_differentiable


def _math_attention():
    # Double backward through attention needs the math kernel (fused kernels have none).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class _ChunkVJP(torch.autograd.Function):
    """gx = J_fn(x)^T gy without keeping fn's graph; its backward recomputes it for the HVP."""

    @staticmethod
    def forward(ctx, fn, x, gy, *consts):
        ctx.fn, ctx.consts = fn, consts
        ctx.save_for_backward(x, gy)
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(fn(xd, *consts), xd, gy)
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx):
        x, gy = ctx.saved_tensors
        with torch.enable_grad(), _math_attention():
            xd = x.detach().requires_grad_(True)
            gyd = gy.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.fn(xd, *ctx.consts), xd, gyd, create_graph=True)
            hx, hgy = torch.autograd.grad(gx, (xd, gyd), ggx, allow_unused=True)
        hx = torch.zeros_like(x) if hx is None else hx
        return (None, hx, hgy) + (None,) * len(ctx.consts)


class _Chunk(torch.autograd.Function):
    """y = fn(x, *consts), saving only x; backward is a :class:`_ChunkVJP` (differentiable once more)."""

    @staticmethod
    def forward(ctx, fn, x, *consts):
        ctx.fn, ctx.consts = fn, consts
        ctx.save_for_backward(x)
        return fn(x, *consts)  # autograd.Function.forward runs without recording a graph

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        return (None, _ChunkVJP.apply(ctx.fn, x, gy, *ctx.consts)) + (None,) * len(ctx.consts)


def chunked_rows(fn: Callable[..., torch.Tensor], x: torch.Tensor, *row_args: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``fn(x, *row_args)`` computed on blocks of ``chunk_size`` rows (dim 0) and concatenated.

    ``fn`` must treat rows independently (true of the text tower over class prompts). Only ``x``
    is differentiated; ``row_args`` (e.g. token ids) are split alongside and treated as constants,
    and ``fn``'s own parameters must be frozen (their gradients are not computed). Peak activation
    memory is that of one chunk, for the forward, the backward and the double backward.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    for a in row_args:
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"row argument has {a.shape[0]} rows, x has {x.shape[0]}")
    if x.shape[0] <= chunk_size and not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x, *row_args)
    outs = []
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start : start + chunk_size]
        args = tuple(a[start : start + chunk_size] for a in row_args)
        if torch.is_grad_enabled() and x.requires_grad:
            outs.append(_Chunk.apply(fn, xc, *args))
        else:
            outs.append(fn(xc, *args))
    return torch.cat(outs, dim=0)


class ClassChunking:
    """Handle returned by :func:`class_chunking`; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, backbone, chunk_size: int):
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if not callable(getattr(backbone, "encode_text_embeddings", None)):
            raise TypeError(f"{type(backbone).__name__} has no encode_text_embeddings(embeddings, ids)")
        self.backbone = backbone
        self.chunk_size = chunk_size
        self._had_own = "encode_text_embeddings" in vars(backbone)
        self._previous = vars(backbone).get("encode_text_embeddings")
        original = backbone.encode_text_embeddings

        def encode_text_embeddings(embeddings, ids):
            return chunked_rows(original, embeddings, ids, chunk_size=chunk_size)

        object.__setattr__(backbone, "encode_text_embeddings", encode_text_embeddings)

    def remove(self) -> None:
        """Give the backbone its own ``encode_text_embeddings`` back."""
        if self._had_own:
            object.__setattr__(self.backbone, "encode_text_embeddings", self._previous)
        else:
            vars(self.backbone).pop("encode_text_embeddings", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def class_chunking(backbone, chunk_size: int) -> ClassChunking:
    """Make ``backbone.encode_text_embeddings`` (Backbone protocol) run ``chunk_size`` classes at a time.

    Works for every model that encodes its class prompts through the backbone (PromptedCLIP's
    CoOp/UNIGRAM text path). Use as ``with class_chunking(model.backbone, 64): trainer.fit(...)``
    or keep the handle and call ``remove()``.
    """
    return ClassChunking(backbone, chunk_size)


class _CheckpointedGrad(torch.autograd.Function):
    """(loss, *grad loss_fn(xs)) without keeping the graph; backward recomputes it (HVP).

    ``loss_fn`` may return a vector of losses (one per task of a batched forward): the gradients are
    those of its sum, and the backward takes the vector's incoming gradient element by element."""

    @staticmethod
    def forward(ctx, loss_fn, batch, names, unused, *xs):
        ctx.loss_fn, ctx.batch, ctx.names = loss_fn, batch, names
        ctx.save_for_backward(*xs)
        with torch.enable_grad():
            xd = [x.detach().requires_grad_(True) for x in xs]
            loss = loss_fn(dict(zip(names, xd)), batch)
            grads = torch.autograd.grad(loss.sum(), xd, allow_unused=True)
        unused.extend(i for i, g in enumerate(grads) if g is None)
        ctx.unused = set(unused)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
        ctx.mark_non_differentiable(*[grads[i] for i in ctx.unused])
        return (loss.detach(), *grads)

    @staticmethod
    @once_differentiable
    def backward(ctx, gloss, *ggrads):
        xs = ctx.saved_tensors
        with torch.enable_grad(), _math_attention():
            xd = [x.detach().requires_grad_(True) for x in xs]
            loss = ctx.loss_fn(dict(zip(ctx.names, xd)), ctx.batch)
            grads = torch.autograd.grad(loss.sum(), xd, create_graph=True, allow_unused=True)
            total = (loss * gloss).sum()
            for i, (g, gg) in enumerate(zip(grads, ggrads)):
                if g is not None and gg is not None and i not in ctx.unused:
                    total = total + (g * gg).sum()
            out = torch.autograd.grad(total, xd, allow_unused=True)
        # an input the loss does not use gets no gradient (None), as in the uncheckpointed graph
        out = [None if i in ctx.unused else (torch.zeros_like(x) if o is None else o)
               for i, (x, o) in enumerate(zip(xs, out))]
        return (None, None, None, None, *out)


def checkpointed_grad(
    loss_fn: Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    batch: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``(loss, {name: d loss / d param})`` differentiable in ``params`` (create_graph semantics)
    while keeping only ``params`` in memory; unused parameters get ``None`` as with
    ``autograd.grad(..., allow_unused=True)``. ``loss_fn`` may return a vector of losses: then
    ``loss`` is that vector and the gradients are those of its sum."""
    names: Sequence[str] = list(params)
    unused: list[int] = []
    loss, *grads = _CheckpointedGrad.apply(loss_fn, batch, names, unused, *params.values())
    return loss, {n: (None if i in unused else g) for i, (n, g) in enumerate(zip(names, grads))}


__all__ = ["chunked_rows", "class_chunking", "ClassChunking", "checkpointed_grad"]
