"""Marking prompt parameters and the PromptInit artefact."""

import json
import pickle
import struct

import pytest
import torch
from torch import nn

from gram_plugin import GradientRegulator, PromptInit, PromptInitError, mark_prompts, prompt_parameters


class Learner(nn.Module):
    def __init__(self, n_ctx=4, width=8):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(n_ctx, width))
        self.meta_net = nn.Linear(width, 2)
        self.frozen = nn.Parameter(torch.randn(3, width), requires_grad=False)


class Wrapper(nn.Module):  # stands in for DataParallel: adds a "module." prefix
    def __init__(self, m):
        super().__init__()
        self.module = m


def test_mark_by_name_pattern_params_and_stable_order():
    m = Learner()
    assert mark_prompts(m, pattern=r"^(ctx|meta_net)") == ["ctx", "meta_net.weight", "meta_net.bias"]
    m2 = Learner()
    mark_prompts(m2, names=["meta_net.bias"])
    mark_prompts(m2, params=[m2.ctx])
    assert list(prompt_parameters(m2)) == ["ctx", "meta_net.bias"]  # registration order, not marking order


def test_pattern_skips_frozen_and_unknown_names_fail():
    m = Learner()
    assert "frozen" not in mark_prompts(m, pattern=".")
    with pytest.raises(KeyError, match="nope"):
        mark_prompts(Learner(), names=["nope"])
    with pytest.raises(ValueError, match="no marked prompt"):
        prompt_parameters(Learner())


def test_wrapper_prefix_is_stripped_both_ways(tmp_path):
    m = Learner()
    mark_prompts(m, names=["ctx"])
    wrapped = Wrapper(m)
    assert list(prompt_parameters(wrapped)) == ["ctx"]
    path = PromptInit.from_module(wrapped, backbone="tiny").save(tmp_path / "i.safetensors")
    target = Learner()
    mark_prompts(target, names=["ctx"])
    PromptInit.load(path).apply_to(target, backbone="tiny")
    assert torch.equal(target.ctx, m.ctx)


def test_round_trip_with_regulator_and_metadata(tmp_path):
    m = Learner()
    mark_prompts(m, pattern="ctx")
    reg = GradientRegulator.for_module(m, rank=2)
    init = PromptInit.from_module(m, method="gram", backbone="ViT-B-32", n_ctx=4, source_tasks={"kind": "chc"})
    init.regulator_state = reg.state_dict()
    init.metadata["regulator_config"] = reg.to_config()
    path = init.save(tmp_path / "init.safetensors")
    back = PromptInit.load(path)
    assert back.metadata["backbone"] == "ViT-B-32" and back.metadata["n_ctx"] == 4
    assert back.describe()["shapes"] == {"ctx": [4, 8]}
    rebuilt = GradientRegulator.from_init(back)
    g = torch.randn(4, 8)
    torch.testing.assert_close(rebuilt("ctx", g), reg("ctx", g))
    with pytest.raises(FileExistsError):
        init.save(path)
    assert PromptInit.load(path).tensors["ctx"].equal(m.ctx.detach())


def test_apply_reports_every_mismatch_and_copies_nothing(tmp_path):
    src = Learner(n_ctx=4)
    mark_prompts(src, pattern="^(ctx|meta_net)")
    init = PromptInit.from_module(src, backbone="ViT-B-32")
    init.tensors["extra"] = torch.zeros(2)
    dst = Learner(n_ctx=16)
    mark_prompts(dst, pattern="^(ctx|meta_net.weight)")
    before = dst.ctx.detach().clone()
    with pytest.raises(PromptInitError) as err:
        init.apply_to(dst, backbone="ViT-B-16")
    msg = str(err.value)
    for part in ["backbone", "shape of ctx: init (4, 8) vs model (16, 8)", "extra", "meta_net.bias"]:
        assert part in msg, part
    assert torch.equal(dst.ctx, before)


def test_apply_keeps_optimizer_references_and_casts_dtype():
    src = Learner()
    mark_prompts(src, names=["ctx"])
    dst = Learner().half()
    mark_prompts(dst, names=["ctx"])
    opt = torch.optim.SGD([dst.ctx], lr=0.1)
    ref = dst.ctx
    PromptInit.from_module(src).apply_to(dst)
    assert dst.ctx is ref and opt.param_groups[0]["params"][0] is ref and dst.ctx.dtype == torch.float16
    torch.testing.assert_close(dst.ctx.float(), src.ctx.detach(), atol=1e-3, rtol=1e-3)


def test_integer_tensor_is_a_dtype_error():
    init = PromptInit({"ctx": torch.zeros(4, 8, dtype=torch.int64)})
    m = Learner()
    mark_prompts(m, names=["ctx"])
    with pytest.raises(PromptInitError, match="dtype of ctx"):
        init.apply_to(m)


def test_truncated_foreign_and_pickle_files_are_clear_errors(tmp_path):
    m = Learner()
    mark_prompts(m, names=["ctx"])
    good = PromptInit.from_module(m).save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptInitError, match="truncated"):
        PromptInit.load(tmp_path / "trunc.safetensors")

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PromptInitError):
        PromptInit.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()

    from safetensors.torch import save_file

    save_file({"ctx": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PromptInitError, match="not written by gram-plugin"):
        PromptInit.load(tmp_path / "plain.safetensors")
    with pytest.raises(PromptInitError, match="does not exist"):
        PromptInit.load(tmp_path / "missing.safetensors")


def test_newer_format_version_is_refused(tmp_path):
    from gram_plugin.safeio import save_tensors

    save_tensors(tmp_path / "f.safetensors", {"ctx": torch.zeros(2)}, {"names": ["ctx"], "format_version": 99})
    with pytest.raises(PromptInitError, match="format version 99"):
        PromptInit.load(tmp_path / "f.safetensors")


def _init_file(tmp_path, meta, name="f.safetensors"):
    from gram_plugin.safeio import save_tensors

    save_tensors(tmp_path / name, {"ctx": torch.zeros(2, 4)}, {"names": ["ctx"], **meta}, kind="prompt-init")
    return tmp_path / name


def test_format_version_1_files_without_a_regulator_scale_load_as_absolute_and_version_2_as_written(tmp_path):
    from gram_plugin.safeio import save_tensors

    reg = GradientRegulator({"ctx": (2, 4)})
    config = {k: v for k, v in reg.to_config().items() if k != "scale"}
    tensors = {"ctx": torch.zeros(2, 4), **{f"regulator.{k}": v for k, v in reg.state_dict().items()}}
    save_tensors(tmp_path / "v1.safetensors", tensors, {"names": ["ctx"], "format_version": 1, "regulator_config": config})
    assert GradientRegulator.from_init(PromptInit.load(tmp_path / "v1.safetensors")).scale == "absolute"
    init = PromptInit({"ctx": torch.zeros(2, 4)}, {"regulator_config": reg.to_config()}, dict(reg.state_dict()))
    back = PromptInit.load(init.save(tmp_path / "v2.safetensors"))
    assert GradientRegulator.from_init(back).scale == "relative"


@pytest.mark.parametrize("meta, message", [
    ({"format_version": "1"}, "'format_version' must be int, got '1'"),
    ({"n_ctx": "four"}, "'n_ctx' must be int, got 'four'"),
    ({"names": "ctx"}, "'names' must be a non-empty list of tensor names, got 'ctx'"),
    ({"regulator_config": {"rank": 2}}, "'regulator_config' needs a 'shapes' mapping"),
])
def test_metadata_with_wrong_types_is_one_clear_error(tmp_path, meta, message):
    path = _init_file(tmp_path, meta)
    with pytest.raises(PromptInitError, match="has invalid metadata: .*" + message.replace("(", r"\(")):
        PromptInit.load(path)


def test_an_init_or_regulator_holding_nan_or_inf_is_refused_before_anything_is_copied(tmp_path):
    m = Learner()
    mark_prompts(m, names=["ctx"])
    before = m.ctx.detach().clone()
    bad = PromptInit.from_module(m)
    bad.tensors["ctx"] = bad.tensors["ctx"].clone()
    bad.tensors["ctx"][0, 0] = float("nan")
    with pytest.raises(PromptInitError, match="ctx holds non-finite values"):
        bad.apply_to(m)
    assert torch.equal(m.ctx.detach(), before)
    reg = GradientRegulator.for_module(m)
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    next(iter(state.values())).fill_(float("inf"))
    init = PromptInit.from_module(m, regulator_config=reg.to_config())
    init.regulator_state = state
    with pytest.raises(PromptInitError, match="regulator holds non-finite values"):
        GradientRegulator.from_init(PromptInit.load(init.save(tmp_path / "r.safetensors")))
