"""MetaPromptTrainer end to end: learning on a task family, resume, logging, bad configs, NaN handling."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer, MetaTrainingError, PromptInit, Task


class ShiftedRegression:
    """Tasks whose best weights are w* + small noise: w* is a known good shared initialisation."""

    def __init__(self, dim=8, noise=0.1, n_support=10, n_query=20):
        self.w_star = torch.linspace(-1.5, 1.5, dim).unsqueeze(0)
        self.dim, self.noise, self.ns, self.nq = dim, noise, n_support, n_query

    def sample(self, g):
        w = self.w_star + self.noise * torch.randn(self.w_star.shape, generator=g)
        x = torch.randn(self.ns + self.nq, self.dim, generator=g)
        y = x @ w.t()
        return Task((x[: self.ns], y[: self.ns]), (x[self.ns :], y[self.ns :]))

    def describe(self):
        return {"kind": "shifted-regression", "dim": self.dim}


def mse(params, batch):
    x, y = batch
    return F.mse_loss(x @ params["w"].t(), y)


def heldout(source, n=16, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [source.sample(g) for _ in range(n)]


@pytest.mark.parametrize("with_regulator,first_order,clip", [(False, False, 5.0), (True, False, None), (True, True, None)])
def test_meta_training_beats_default_init(with_regulator, first_order, clip):
    source = ShiftedRegression()
    params = {"w": torch.zeros(1, 8)}
    reg = GradientRegulator({"w": (1, 8)}) if with_regulator else None
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, outer_lr=0.05, regulator_lr=0.01, meta_batch_size=4,
                     steps=150, first_order=first_order, clip_gamma=clip, seed=0, progress=False)
    tr = MetaPromptTrainer(mse, params, regulator=reg, config=cfg)
    tasks = heldout(source)
    before = tr.evaluate(tasks)["query_loss_after"]
    init = tr.fit(source)
    after = tr.evaluate(tasks)["query_loss_after"]
    assert after < 0.15 * before, (before, after)
    assert torch.allclose(init.tensors["w"], source.w_star, atol=0.25)
    assert init.metadata["method"] == ("gram" if with_regulator else "maml-clip")
    assert init.metadata["source_tasks"]["kind"] == "shifted-regression"
    assert (GradientRegulator.from_init(init) is not None) == with_regulator


def _run(tmp_path, steps, resume=False, checkpoint_every=2):
    reg = GradientRegulator({"w": (1, 8)}, rank=2)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=2, outer_lr=0.05, meta_batch_size=3, steps=steps, seed=7,
                     checkpoint_every=checkpoint_every, clip_gamma=1.0, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, regulator=reg, config=cfg, run_dir=tmp_path)
    return tr, tr.fit(ShiftedRegression(), resume=resume)


def test_resume_equals_uninterrupted_run(tmp_path):
    _, full = _run(tmp_path / "full", steps=8)
    _run(tmp_path / "cut", steps=4)  # "interrupted" after the checkpoint at step 4
    tr, resumed = _run(tmp_path / "cut", steps=8, resume=True)
    assert tr.step == 8
    assert torch.equal(full.tensors["w"], resumed.tensors["w"])
    for k, v in full.regulator_state.items():
        assert torch.equal(v, resumed.regulator_state[k]), k
    rows = list(csv.DictReader(open(tmp_path / "cut" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))


def test_init_round_trip_and_metadata(tmp_path):
    _, init = _run(tmp_path / "r", steps=2)
    path = init.save(tmp_path / "init.safetensors")
    back = PromptInit.load(path)
    assert torch.equal(back.tensors["w"], init.tensors["w"])
    assert back.metadata["meta_config"]["inner_steps"] == 2
    reg = GradientRegulator.from_init(back)
    assert reg.rank == 2 and torch.equal(reg.state_dict()["heads.w.gamma.v"], init.regulator_state["heads.w.gamma.v"])


@pytest.mark.parametrize("field,value", [("inner_lr", 0.0), ("outer_lr", -1.0), ("regulator_lr", float("nan")),
                                         ("inner_steps", 0), ("meta_batch_size", 0), ("clip_gamma", 0.0),
                                         ("on_nonfinite", "ignore")])
def test_bad_config_is_one_clear_error(field, value):
    with pytest.raises(ValueError, match=field):
        MetaConfig(**{field: value})


def nan_after(step_to_break):
    calls = {"n": 0}

    def loss(params, batch):
        calls["n"] += 1
        out = mse(params, batch)
        return out * float("nan") if calls["n"] > step_to_break else out

    return loss


def test_nonfinite_raise_names_the_step_and_keeps_params():
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=5, progress=False)
    # 2 tasks x (1 support + 1 query) = 4 loss calls per outer step: break in step 3
    tr = MetaPromptTrainer(nan_after(8), {"w": torch.zeros(1, 8)}, config=cfg)
    with pytest.raises(MetaTrainingError, match="outer step 3"):
        tr.fit(ShiftedRegression())
    assert torch.isfinite(tr.params["w"]).all()


def test_nonfinite_skip_drops_the_step_and_reports_it():
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=4, progress=False, on_nonfinite="skip")
    tr = MetaPromptTrainer(nan_after(8), {"w": torch.zeros(1, 8)}, config=cfg)
    init = tr.fit(ShiftedRegression())
    assert tr.skipped_steps == [3, 4]
    assert init.metadata["skipped_steps"] == [3, 4]
    assert torch.isfinite(init.tensors["w"]).all()


def test_unwritable_run_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = MetaConfig(steps=1, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, config=cfg, run_dir=blocker / "run")
    with pytest.raises(MetaTrainingError, match="not writable"):
        tr.fit(ShiftedRegression())
    assert tr.step == 0


def test_alignment_tracking_logs_cosines():
    reg = GradientRegulator({"w": (1, 8)})
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=2, track_alignment=True, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, regulator=reg, config=cfg)
    tr.fit(ShiftedRegression())
    rec = tr.history[-1]
    assert -1.0 <= rec["align_raw"] <= 1.0 and -1.0 <= rec["align_regulated"] <= 1.0
    assert not math.isnan(rec["align_raw"])
