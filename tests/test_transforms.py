"""Gradient transforms and the regulator against their formulas on hand-computed cases."""

import math

import pytest
import torch

from gram_plugin import GradientRegulator, chain, clip_meta, identity, prograd, regulate


def _set_hand_weights(reg):
    head = reg.heads["ctx"]
    with torch.no_grad():
        head.gamma.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, -1.0]]))
        head.gamma.bias.copy_(torch.tensor([0.1, 0.0, 0.2]))
        head.beta.weight.copy_(torch.eye(3) * 0.5)
        head.beta.bias.copy_(torch.tensor([0.0, -0.1, 0.0]))
    return reg


def _hand_expected(g, s):
    """tanh(W_g g/s + b_g) * g + tanh(W_b g/s + b_b) * s, written out entry by entry."""
    expected = torch.empty_like(g)
    wg = [[1.0, 0, 0], [0, 2.0, 0], [0, 0, -1.0]]
    bg, bb = [0.1, 0.0, 0.2], [0.0, -0.1, 0.0]
    for r in range(2):  # the linear maps act on the last (embedding) dimension, shared across rows
        for c in range(3):
            pre_g = sum(wg[c][j] * g[r, j].item() / s for j in range(3)) + bg[c]
            pre_b = 0.5 * g[r, c].item() / s + bb[c]
            expected[r, c] = math.tanh(pre_g) * g[r, c].item() + math.tanh(pre_b) * s
    return expected


G = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.5, -0.4]], dtype=torch.float64)


def test_regulator_formula_hand_computed_absolute():
    reg = _set_hand_weights(GradientRegulator({"ctx": (2, 3)}, init_gain=0.5, scale="absolute").double())
    torch.testing.assert_close(reg("ctx", G), _hand_expected(G, 1.0))


def test_regulator_formula_hand_computed_relative():
    reg = _set_hand_weights(GradientRegulator({"ctx": (2, 3)}, init_gain=0.5).double())
    rms = math.sqrt(sum(v * v for v in G.flatten().tolist()) / 6)
    torch.testing.assert_close(reg("ctx", G), _hand_expected(G, rms))
    # degree-1 homogeneous: scaling the gradient (loss scale, logit scale) scales the output
    torch.testing.assert_close(reg("ctx", 1e-3 * G), 1e-3 * reg("ctx", G))
    zero = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = reg("ctx", zero)
    assert out.abs().max() < 1e-14  # no drift on a zero gradient (eps in s leaves ~1e-16)
    (d,) = torch.autograd.grad(out.sum(), zero)
    assert torch.isfinite(d).all()


def test_regulator_config_round_trip_and_a_missing_option_takes_the_constructor_default():
    reg = GradientRegulator({"a": (2, 4)}, scale="absolute")
    assert GradientRegulator.from_config(reg.to_config()).scale == "absolute"
    assert GradientRegulator.from_config(GradientRegulator({"a": (2, 4)}).to_config()).scale == "relative"
    old = {k: v for k, v in reg.to_config().items() if k != "scale"}
    # one default, the constructor's; what old files meant is decided by their format version (test_prompts)
    assert GradientRegulator.from_config(old).scale == "relative"
    with pytest.raises(ValueError, match="scale must be"):
        GradientRegulator({"a": (2, 4)}, scale="log")


def test_regulator_initial_state_is_scaled_identity():
    reg = GradientRegulator({"a": (4, 8)}, init_gain=0.9)
    g = torch.randn(4, 8)
    torch.testing.assert_close(reg("a", g), 0.9 * g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_regulator_keeps_dtype_and_computes_in_float32(dtype):
    reg = GradientRegulator({"a": (3, 5)}, rank=2)
    g = torch.randn(3, 5).to(dtype)
    out = reg("a", g)
    assert out.dtype == dtype and out.shape == g.shape
    torch.testing.assert_close(out, reg("a", g.float()).to(dtype))


def test_regulator_share_by_width_and_errors():
    reg = GradientRegulator({"l0.vpt": (2, 6), "l1.vpt": (2, 6), "ctx": (4, 3)}, share_by_width=True)
    assert set(reg.heads) == {"width_6", "width_3"}
    with pytest.raises(KeyError, match="no head"):
        reg("other", torch.zeros(2, 6))
    with pytest.raises(ValueError, match="init_gain"):
        GradientRegulator({"a": (2,)}, init_gain=1.0)
    with pytest.raises(ValueError, match="scalar"):
        GradientRegulator({"a": ()})


def test_regulate_transform_leaves_none_and_unknown_alone():
    reg = GradientRegulator({"a": (2, 2)}, init_gain=0.5)
    g = {"a": torch.ones(2, 2), "b": torch.ones(3), "c": None}
    out = regulate(reg)(g)
    torch.testing.assert_close(out["a"], 0.5 * torch.ones(2, 2))
    assert out["b"] is g["b"] and out["c"] is None


def test_prograd_projects_only_conflicting_tensors():
    gd = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([1.0, 1.0]), "z": torch.tensor([2.0, 0.0]), "n": None}
    gg = {"x": torch.tensor([-1.0, 1.0]), "y": torch.tensor([1.0, 0.0]), "z": torch.zeros(2), "n": torch.ones(1)}
    out = prograd(1.0)(gd, general_grads=gg)
    # x conflicts (dot = -1): x - (-1 / 2) * gg = [0.5, 0.5], orthogonal to gg
    torch.testing.assert_close(out["x"], torch.tensor([0.5, 0.5]))
    assert out["y"] is gd["y"]  # agrees: unchanged
    assert out["z"] is gd["z"]  # zero general gradient: guarded
    assert out["n"] is None
    half = prograd(0.5)(gd, general_grads=gg)
    torch.testing.assert_close(half["x"], torch.tensor([0.75, 0.25]))


def test_prograd_fp16_in_fp16_out_and_needs_context():
    gd = {"x": torch.tensor([1.0, 0.0], dtype=torch.float16)}
    gg = {"x": torch.tensor([-1.0, 1.0], dtype=torch.float16)}
    out = prograd()(gd, general_grads=gg)
    assert out["x"].dtype == torch.float16
    torch.testing.assert_close(out["x"], torch.tensor([0.5, 0.5], dtype=torch.float16))
    with pytest.raises(KeyError, match="general_grads"):
        prograd()(gd)
    with pytest.raises(ValueError):
        prograd(-1.0)


def test_clip_meta_formula():
    g = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]]), "c": None}  # global norm 5
    out = clip_meta(2.0)(g)
    torch.testing.assert_close(out["a"], torch.tensor([1.2, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[0.0, 1.6]]))
    assert out["c"] is None
    same = clip_meta(10.0)(g)  # below the threshold: unchanged
    torch.testing.assert_close(same["a"], g["a"])
    h = clip_meta(1.0)({"a": torch.tensor([3.0, 4.0], dtype=torch.float16)})["a"]
    assert h.dtype == torch.float16
    torch.testing.assert_close(h, torch.tensor([0.6, 0.8], dtype=torch.float16))
    with pytest.raises(ValueError):
        clip_meta(0.0)


def test_chain_applies_in_order_and_does_not_mutate_input():
    g = {"a": torch.tensor([6.0, 8.0])}
    before = g["a"].clone()
    reg = GradientRegulator({"a": (2,)}, init_gain=0.5)
    out = chain(clip_meta(5.0), regulate(reg), identity())(g)
    torch.testing.assert_close(out["a"], torch.tensor([1.5, 2.0]))
    assert torch.equal(g["a"], before)
    assert "clip_meta(gamma=5.0)" in repr(chain(clip_meta(5.0)))
