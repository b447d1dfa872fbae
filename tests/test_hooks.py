"""The optimiser step pre-hook: fp32, fp16 and GradScaler (amp) paths."""

import pytest
import torch
from torch import nn

from gram_plugin import GradientRegulator, chain, clip_meta, install_gradient_transform, regulate


def test_hook_regulates_exactly_before_step():
    p = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    other = nn.Parameter(torch.tensor([5.0]))
    opt = torch.optim.SGD([p, other], lr=0.1)
    reg = GradientRegulator({"p": (1, 2)}, init_gain=0.5)
    hook = install_gradient_transform(opt, {"p": p}, regulate(reg))
    (p.sum() * 3 + other.sum() * 2).backward()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[1.0 - 0.1 * 1.5, 2.0 - 0.1 * 1.5]]))
    torch.testing.assert_close(other.detach(), torch.tensor([5.0 - 0.2]))  # not named: untouched
    assert hook.steps == 1
    hook.remove()
    opt.zero_grad()
    p.sum().backward()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[0.85 - 0.1, 1.85 - 0.1]]))


def test_hook_on_fp16_params_keeps_dtype():
    p = nn.Parameter(torch.ones(2, 4, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=1.0)
    install_gradient_transform(opt, {"p": p}, regulate(GradientRegulator({"p": (2, 4)}, init_gain=0.5)))
    (p.float().sum()).backward()
    opt.step()
    assert p.dtype == torch.float16
    torch.testing.assert_close(p.detach(), torch.full((2, 4), 0.5, dtype=torch.float16))


def test_gradscaler_path_regulates_unscaled_grads_and_skips_inf_steps():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = torch.optim.SGD([p], lr=1.0)
    seen = []

    def spy(grads, **extra):
        seen.append(grads["p"].clone())
        return grads

    install_gradient_transform(opt, {"p": p}, chain(spy, clip_meta(1.0)))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([[3.0, 4.0]])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(seen[0], torch.tensor([[3.0, 4.0]]))  # unscaled by the time we see it
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0 - 0.6, 4.0 - 0.8]]))
    before = p.detach().clone()
    opt.zero_grad()
    scaler.scale(p.sum() * float("inf")).backward()
    scaler.step(opt)  # inf found: step skipped, hook not called
    scaler.update()
    assert len(seen) == 1 and torch.equal(p.detach(), before)


def test_hook_needs_params_of_that_optimizer():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="none of the given parameters"):
        install_gradient_transform(opt, {"x": nn.Parameter(torch.zeros(1))}, clip_meta(1.0))
