"""Faults and properties: kill -9 then resume, atomic checkpoints, transform invariants (hypothesis)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram_plugin import GradientRegulator, MetaPromptTrainer, PromptInit, clip_meta, prograd
from gram_plugin.meta import CHECKPOINT_NAME

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_meta_training import ShiftedRegression, mse
    from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
    run_dir, steps, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    cfg = MetaConfig(inner_lr=0.05, inner_steps=2, outer_lr=0.05, meta_batch_size=3, steps=steps, seed=3,
                     checkpoint_every=2, progress=False)
    tr = MetaPromptTrainer(mse, {{"w": torch.zeros(1, 8)}}, regulator=GradientRegulator({{"w": (1, 8)}}),
                           config=cfg, run_dir=run_dir)
    init = tr.fit(ShiftedRegression(), resume=True, callback=lambda r: time.sleep(delay))
    init.save(run_dir + "/init.safetensors", overwrite=True)
    """
)


def _launch(tmp_path, run_dir, steps, delay):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    return subprocess.Popen([sys.executable, str(script), str(run_dir), str(steps), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    steps = 12
    ref = _launch(tmp_path, tmp_path / "ref", steps, 0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()

    victim = _launch(tmp_path, tmp_path / "cut", steps, 0.3)
    ckpt = tmp_path / "cut" / CHECKPOINT_NAME
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "init.safetensors").exists()
    # the checkpoint on disk is whole (atomic write), at most one interval behind
    probe = MetaPromptTrainer(lambda p, b: p["w"].sum(), {"w": torch.zeros(1, 8)},
                              regulator=GradientRegulator({"w": (1, 8)}))
    probe.load_checkpoint(ckpt)
    assert 2 <= probe.step < steps and probe.step % 2 == 0
    # whatever a kill mid-write leaves is hidden (a dot name), never a file a resume could take for a checkpoint
    visible = {p.name for p in (tmp_path / "cut").iterdir() if not p.name.startswith(".")}
    assert visible <= {CHECKPOINT_NAME, "checkpoint.prev.safetensors", "log.csv"}, visible

    resumed = _launch(tmp_path, tmp_path / "cut", steps, 0.0)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a = PromptInit.load(tmp_path / "ref" / "init.safetensors")
    b = PromptInit.load(tmp_path / "cut" / "init.safetensors")
    assert torch.equal(a.tensors["w"], b.tensors["w"])
    for k in a.regulator_state:
        assert torch.equal(a.regulator_state[k], b.regulator_state[k])


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from test_meta_training import ShiftedRegression, mse
    from gram_plugin import MetaConfig

    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=2, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, config=cfg, run_dir=tmp_path)
    tr.fit(ShiftedRegression())
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        tr.save_checkpoint()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@st.composite
def grad_pairs(draw):
    shape = draw(shapes)
    n = 1
    for s in shape:
        n *= s
    d = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n))).reshape(shape)
    g = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n))).reshape(shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return d.to(dtype), g.to(dtype)


@settings(max_examples=150, deadline=None)
@given(grad_pairs(), st.floats(0.0, 1.0))
def test_prograd_never_increases_conflict(pair, lam):
    d, g = pair
    out = prograd(lam)({"p": d}, general_grads={"p": g})["p"]
    assert out.shape == d.shape and out.dtype == d.dtype
    before = float((d.double() * g.double()).sum())
    after = float((out.double() * g.double()).sum())
    tol = 1e-4 * (float(d.double().norm()) * float(g.double().norm()) + 1.0)
    if before < 0:
        assert after >= before - tol  # conflict reduced (to ~0 when lam == 1)
        if lam == 1.0:
            assert abs(after) <= tol
    else:
        assert torch.equal(out, d)


@settings(max_examples=150, deadline=None)
@given(st.lists(grad_pairs(), min_size=1, max_size=3), st.floats(1e-3, 1e3))
def test_clip_never_exceeds_gamma_and_keeps_direction(pairs, gamma):
    grads = {f"p{i}": d for i, (d, _) in enumerate(pairs)}
    out = clip_meta(gamma)(grads)
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in out.values()))
    assert float(norm) <= gamma * (1 + 1e-5)
    for k, v in out.items():
        assert v.shape == grads[k].shape and v.dtype == grads[k].dtype
        # same direction: a non-negative multiple of the input
        assert float((v.double() * grads[k].double()).sum()) >= -1e-9


# ---------------------------------------------------------------------------------------------------
# Issue 19: the CLI and the trainer keep the library's promises. One test per reported case.
# ---------------------------------------------------------------------------------------------------
from gram_plugin import CheckpointError, MetaConfig, MetaTrainingError, RunFolderError  # noqa: E402
from gram_plugin.cli import main  # noqa: E402
from gram_plugin.safeio import load_tensors, locked_dir, save_tensors  # noqa: E402

PACKAGE_IMAGES = REPO / "gram_plugin" / "assets" / "caltech10"
BASE = ["--quiet", "--threads", "1", "--backbone", "tiny"]
FAST = [*BASE, "--epochs", "1"]
META = ["--meta-steps", "2", "--inner-steps", "1", "--meta-batch-size", "2"]


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def image_folder(tmp_path, classes=("Faces", "pizza"), per_class=4) -> Path:
    root = tmp_path / "images"
    for c in classes:
        (root / c).mkdir(parents=True)
        for p in sorted((PACKAGE_IMAGES / c).iterdir())[:per_class]:
            shutil.copy(p, root / c / p.name)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real meta-trained init and a tuned prompt from the tiny backbone, made once."""
    base = tmp_path_factory.mktemp("trained")
    assert main(["meta-train", "--out", str(base / "m"), *BASE, *META]) == 0
    assert main(["tune", "--out", str(base / "t"), *FAST, "--init", str(base / "m" / "init.safetensors")]) == 0
    return base


def _damaged_init(src: Path, dst: Path, where: str, value: float) -> Path:
    init = PromptInit.load(src)
    if where == "prompt":
        init.tensors["ctx"] = init.tensors["ctx"].clone()
        init.tensors["ctx"][0, 0] = value
    else:
        key = next(iter(init.regulator_state))
        init.regulator_state[key] = init.regulator_state[key].clone().fill_(value)
    return init.save(dst)


# -- silent wrong results ---------------------------------------------------------------------------
@pytest.mark.parametrize("where, value", [("prompt", float("nan")), ("prompt", float("inf")), ("regulator", float("nan"))])
def test_tune_refuses_an_init_holding_nan_or_inf_and_writes_nothing(tmp_path, capsys, trained, where, value):
    bad = _damaged_init(trained / "m" / "init.safetensors", tmp_path / "bad.safetensors", where, value)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", bad)
    assert rc == 2 and "holds non-finite values (NaN or Inf)" in err and ("ctx" in err if where == "prompt" else "regulator." in err)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tune_with_an_exploding_lr_stops_naming_epoch_and_step_and_writes_no_result(tmp_path, capsys, optimizer):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--lr", "1e30", "--optimizer", optimizer)
    assert rc == 2
    assert re.search(r"epoch 1, step \d+: (non-finite training loss|the update made \['ctx'\] non-finite)", err), err
    assert not (tmp_path / "t" / "prompt.safetensors").exists() and not (tmp_path / "t" / "metrics.json").exists()


def test_demo_with_an_exploding_lr_stops_and_writes_no_result(tmp_path, capsys):
    rc, err = cli(capsys, "demo", "--out", tmp_path / "d", *FAST, *META, "--lr", "1e30")
    assert rc == 2 and re.search(r"epoch 1, step \d+: ", err), err
    assert not [p for p in ("metrics.json", "prompt.safetensors", "init.safetensors") if (tmp_path / "d" / p).exists()]


def test_an_infinite_lr_is_an_input_error(tmp_path, capsys):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--lr", "inf")
    assert rc == 2 and "--lr must be a finite number > 0, got inf" in err


def test_eval_of_an_all_nan_prompt_is_an_error_not_chance_accuracy(tmp_path, capsys, trained):
    prompt = PromptInit.load(trained / "t" / "prompt.safetensors")
    prompt.tensors["ctx"] = torch.full_like(prompt.tensors["ctx"], float("nan"))
    path = prompt.save(tmp_path / "nan.safetensors")
    rc, err = cli(capsys, "eval", "--out", tmp_path / "e", *BASE, "--prompt", path)
    assert rc == 2 and "holds non-finite values (NaN or Inf) in ['ctx']" in err
    assert not (tmp_path / "e").exists()


def test_evaluate_refuses_a_model_whose_prompt_became_nan(tiny_clip):
    from gram_plugin.backbones import OpenCLIPBackbone
    from gram_plugin.data import default_dataset
    from gram_plugin.finetune import TuningError, evaluate
    from gram_plugin.models import PromptedCLIP

    model = PromptedCLIP(OpenCLIPBackbone(tiny_clip, name="tiny"))
    with torch.no_grad():
        model.ctx.fill_(float("nan"))
    ds = default_dataset(model.backbone.preprocess)
    with pytest.raises(TuningError, match=r"non-finite values \(NaN or Inf\) in \['ctx'\]: no accuracy"):
        evaluate(model, ds.subset(range(4)))


def test_skip_with_every_step_skipped_is_an_error_not_an_exported_nan_init():
    from test_meta_training import ShiftedRegression

    def always_nan(params, batch):
        return (params["w"] * float("nan")).sum()

    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=3, progress=False, on_nonfinite="skip")
    tr = MetaPromptTrainer(always_nan, {"w": torch.zeros(1, 8)}, config=cfg)
    with pytest.raises(MetaTrainingError, match="all 3 outer steps were non-finite and skipped: nothing was learned"):
        tr.fit(ShiftedRegression())
    assert all(math.isnan(r["meta_loss"]) for r in tr.history)  # a skipped step logs nan, never 0.0


def test_meta_training_refuses_a_nan_init_up_front():
    from test_meta_training import ShiftedRegression, mse

    cfg = MetaConfig(steps=2, progress=False, on_nonfinite="skip")
    tr = MetaPromptTrainer(mse, {"w": torch.full((1, 8), float("nan"))}, config=cfg)
    with pytest.raises(MetaTrainingError, match=r"init holds non-finite values \(NaN or Inf\) in \['w'\]"):
        tr.fit(ShiftedRegression())
    assert tr.step == 0


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be an integer >= 1, got -3"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--test-fraction", "1.5"], "--test-fraction must lie in (0, 1), got 1.5"),
    (["--test-fraction", "-0.5"], "--test-fraction must lie in (0, 1), got -0.5"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be an integer >= 1, got -4"),
    (["--backbone", "tiny:abc"], "--backbone tiny:SEED needs a whole-number seed, got 'abc'"),
])
def test_bad_numbers_are_input_errors_and_nothing_is_written(tmp_path, capsys, flags, message):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, *flags)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "t").exists()


def test_all_bad_numbers_are_listed_in_one_error(tmp_path, capsys):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--epochs", "0", "--lr", "0", "--batch-size", "-4",
                  "--test-fraction", "1.5")
    assert rc == 2 and err.count("\n  - ") == 4


# -- lost or mixed-up runs --------------------------------------------------------------------------
def test_cli_meta_train_checkpoints_and_resume_equal_an_uninterrupted_run(tmp_path, capsys):
    assert main(["meta-train", "--out", str(tmp_path / "ref"), *BASE, *META[2:], "--meta-steps", "4"]) == 0
    assert main(["meta-train", "--out", str(tmp_path / "cut"), *BASE, *META[2:], "--meta-steps", "2"]) == 0
    assert (tmp_path / "cut" / "meta" / "checkpoint.safetensors").is_file()
    rc, err = cli(capsys, "meta-train", "--out", tmp_path / "cut", *BASE, *META[2:], "--meta-steps", "4", "--resume")
    assert rc == 0, err
    a = PromptInit.load(tmp_path / "ref" / "init.safetensors")
    b = PromptInit.load(tmp_path / "cut" / "init.safetensors")
    assert b.metadata["meta_steps"] == 4
    assert torch.equal(a.tensors["ctx"], b.tensors["ctx"])
    for k in a.regulator_state:
        assert torch.equal(a.regulator_state[k], b.regulator_state[k])


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    assert main(["meta-train", "--out", str(tmp_path / "m"), *BASE, *META]) == 0
    before = (tmp_path / "m" / "config.yaml").read_bytes()
    rc, err = cli(capsys, "meta-train", "--out", tmp_path / "m", *BASE, *META, "--inner-lr", "0.5", "--resume")
    assert rc == 2 and "options differ from the run's config.yaml" in err and "inner_lr" in err
    assert (tmp_path / "m" / "config.yaml").read_bytes() == before


def test_a_non_empty_run_folder_is_refused_and_left_as_it_was(tmp_path, capsys, trained):
    out = tmp_path / "t"
    shutil.copytree(trained / "t", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--lr", "0.5")
    assert rc == 2 and "is not empty" in err and "--overwrite" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--lr", "0.5", "--overwrite")
    assert rc == 0, err
    assert "lr: 0.5" in (out / "config.yaml").read_text()


def test_a_run_folder_in_use_is_refused_on_the_cli(tmp_path, capsys):
    with locked_dir(tmp_path / "busy"):  # another run holds it
        rc, err = cli(capsys, "tune", "--out", tmp_path / "busy", *FAST)
    assert rc == 2 and "in use by another run" in err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == [".lock"]


def test_two_trainers_on_one_run_dir_do_not_both_write(tmp_path):
    from test_meta_training import ShiftedRegression, mse

    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=2, progress=False)
    first = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, config=cfg, run_dir=tmp_path)
    second = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, config=cfg, run_dir=tmp_path)
    seen = []

    def start_second(record):
        if not seen:
            with pytest.raises(RunFolderError, match="in use by another run"):
                second.fit(ShiftedRegression())
            seen.append(second.step)

    first.fit(ShiftedRegression(), callback=start_second)
    assert seen == [0]


def test_invalid_input_creates_no_run_folder(tmp_path, capsys):
    rc, _ = cli(capsys, "meta-train", "--out", tmp_path / "new", *BASE, *META, "--inner-lr", "-1")
    assert rc == 2 and not (tmp_path / "new").exists()


def _checkpointed_run(run_dir, steps):
    from test_meta_training import ShiftedRegression, mse

    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, outer_lr=0.05, meta_batch_size=2, steps=steps, seed=1,
                     checkpoint_every=1, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, regulator=GradientRegulator({"w": (1, 8)}), config=cfg,
                           run_dir=run_dir)
    return tr, tr.fit(ShiftedRegression(), resume=True)


def test_a_flipped_checkpoint_byte_is_caught_and_the_previous_checkpoint_resumes_the_run(tmp_path):
    _, ref = _checkpointed_run(tmp_path / "ref", 4)
    _checkpointed_run(tmp_path / "cut", 2)
    _checkpointed_run(tmp_path / "cut", 3)  # checkpoint = step 3, checkpoint.prev = step 3's predecessor
    ckpt = tmp_path / "cut" / CHECKPOINT_NAME
    raw = bytearray(ckpt.read_bytes())
    raw[-3] ^= 0x10  # payload: the last tensor's bytes
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_tensors(ckpt, error=CheckpointError)
    with pytest.warns(UserWarning, match=r"damaged: checksum mismatch .* resumed from the previous checkpoint"):
        tr, got = _checkpointed_run(tmp_path / "cut", 4)
    assert torch.equal(got.tensors["w"], ref.tensors["w"])


def _rewrite_checkpoint(path, drop=(), **meta_changes):
    tensors, meta = load_tensors(path)
    for key in drop:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(key)}
    meta.update(meta_changes)
    save_tensors(path, tensors, meta)


@pytest.mark.parametrize("drop, changes, message", [
    (("rng/",), {}, r"task-sampler RNG state \(rng/generator\) is missing"),
    (("opt_theta/",), {}, r"optimiser tensors missing: \['opt_theta/0/"),
    ((), {"opt_phi": None}, "no optimiser state 'opt_phi'"),
    ((), {"step": "three"}, "'step' must be a whole number >= 0, got 'three'"),
    ((), {"step": 999}, "it is at step 999, beyond this run's 4 steps"),
])
def test_an_incomplete_checkpoint_is_one_clear_error(tmp_path, drop, changes, message):
    _checkpointed_run(tmp_path, 2)
    for name in (CHECKPOINT_NAME, "checkpoint.prev.safetensors"):
        _rewrite_checkpoint(tmp_path / name, drop, **changes)
    with pytest.raises(CheckpointError, match=message):
        _checkpointed_run(tmp_path, 4)


# -- clear errors instead of tracebacks -------------------------------------------------------------
def test_a_corrupt_or_truncated_jpeg_is_named_and_can_be_skipped_with_a_count(tmp_path, capsys):
    root = image_folder(tmp_path)
    good = (root / "Faces" / "image_0001.jpg").read_bytes()
    (root / "Faces" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "pizza" / "junk.jpg").write_bytes(b"not a jpeg at all")
    rc, err = cli(capsys, "tune", "--out", tmp_path / "a", *FAST, "--data", f"folder:{root}")
    assert rc == 2 and re.search(r"cannot read image \S+(cut|junk)\.jpg", err) and "--skip-unreadable" in err
    rc, err = cli(capsys, "tune", "--out", tmp_path / "b", *FAST, "--data", f"folder:{root}", "--skip-unreadable")
    assert rc == 0, err
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "left out 2 unreadable images (--skip-unreadable)" in log and "cut.jpg" in log and "junk.jpg" in log


def test_a_class_folder_whose_name_is_not_utf8_is_named(tmp_path, capsys):
    root = image_folder(tmp_path)
    os.rename(root / "pizza", os.fsencode(root) + b"/pizz\xe4")  # Latin-1 bytes
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--data", f"folder:{root}")
    assert rc == 2 and "not valid UTF-8" in err and r"pizz\xe4" in err


@pytest.mark.parametrize("meta, message", [
    ("[1, 2]", "metadata must be a JSON object, got list"),
    ('{"names": ["ctx"], "format_version": "1"}', "'format_version' must be int, got '1'"),
    ('{"names": ["ctx"], "n_ctx": "four"}', "'n_ctx' must be int, got 'four'"),
])
@pytest.mark.parametrize("command", ["inspect", "tune"])
def test_metadata_that_breaks_the_schema_is_one_clear_error(tmp_path, capsys, meta, message, command):
    from safetensors.torch import save_file

    path = tmp_path / "init.safetensors"
    save_file({"ctx": torch.zeros(4, 32)}, str(path), metadata={"gram_plugin": meta})
    argv = ["inspect", path] if command == "inspect" else ["tune", "--out", tmp_path / "t", *FAST, "--init", path]
    rc, err = cli(capsys, *argv)
    assert rc == 2 and message in err


def test_a_prompt_longer_than_the_text_tower_is_named(tmp_path, capsys):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--n-ctx", "200", "--ctx-init", "random")
    assert rc == 2 and "n_ctx=200 is too long" in err and "its text tower takes 77, so n_ctx <= 73" in err
    assert not (tmp_path / "t").exists()


def test_out_or_cache_dir_naming_a_file_is_an_input_error(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    rc, err = cli(capsys, "tune", "--out", f, *FAST)
    assert rc == 2 and f"--out {f} is a file, not a folder" in err
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--cache-dir", f)
    assert rc == 2 and f"--cache-dir {f} is a file, not a folder" in err
    assert f.read_text() == "keep me" and not (tmp_path / "t").exists()


def test_an_unwritable_out_is_an_input_error(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permissions: use a file system that refuses new files
        out = Path("/proc/gram-plugin-test-run")
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    rc, err = cli(capsys, "tune", "--out", out, *FAST)
    assert rc == 2 and f"--out {out} is not writable" in err


@pytest.mark.parametrize("text, message", [
    ("epochs: !!python/object/apply:os.system ['echo pwned']\n", "is not plain YAML"),
    ("epochs: [1\n", "is not plain YAML"),
])
def test_a_config_with_a_python_tag_or_malformed_yaml_is_a_clear_error(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--config", cfg)
    assert rc == 2 and f"--config {cfg} {message}" in err and "Traceback" not in err


def test_a_folder_given_as_init_is_called_a_folder(tmp_path, capsys):
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", tmp_path)
    assert rc == 2 and f"init file {tmp_path} is a folder, not a file" in err


def test_a_checkpoint_or_cache_given_as_init_says_what_it_is(tmp_path, capsys):
    assert main(["meta-train", "--out", str(tmp_path / "m"), *BASE, *META]) == 0
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", tmp_path / "m" / "meta" / CHECKPOINT_NAME)
    assert rc == 2 and "is a meta-training checkpoint, not an init file" in err
    cache = next((tmp_path / "m" / "feature_cache").glob("*.safetensors"))
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", cache)
    assert rc == 2 and "is a feature cache file, not an init file" in err


def test_an_init_for_another_mode_conflicts_with_an_explicit_mode_and_otherwise_sets_it(tmp_path, capsys, trained):
    init = PromptInit.load(trained / "m" / "init.safetensors")
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", trained / "m" / "init.safetensors",
                  "--mode", "vpt")
    assert rc == 2 and "--mode 'vpt' differs from the mode 'coop' that" in err and "backbone" not in err
    assert init.metadata["mode"] == "coop"
    rc, err = cli(capsys, "tune", "--out", tmp_path / "u", *FAST, "--init", trained / "m" / "init.safetensors")
    assert rc == 0, err
    assert "mode: coop" in (tmp_path / "u" / "config.yaml").read_text()


def test_a_one_class_dataset_is_refused_up_front(tmp_path, capsys):
    root = image_folder(tmp_path, classes=("Faces",))
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--data", f"folder:{root}")
    assert rc == 2 and "dataset images has 1 class (['Faces']): base-to-new evaluation needs at least 2 classes" in err
    assert "this one has no new classes" in err
    assert not (tmp_path / "t").exists()


def test_empty_class_folders_are_warned_about_and_left_out(tmp_path):
    from gram_plugin.data import image_folder as load_folder

    root = image_folder(tmp_path)
    (root / "empty_class").mkdir()
    with pytest.warns(UserWarning, match=r"1 class folders hold no images and are left out: \['empty_class'\]"):
        ds = load_folder(root)
    assert ds.classnames == ["Faces", "pizza"] and len(ds) == 8


def test_cheap_inputs_are_checked_before_the_dataset_is_read(tmp_path, capsys, monkeypatch):
    import gram_plugin.data

    def no_loading(*a, **k):
        raise AssertionError("the dataset was loaded before the init file was checked")

    monkeypatch.setattr(gram_plugin.data, "load_dataset", no_loading)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", tmp_path / "missing.safetensors")
    assert rc == 2 and "init file" in err and "does not exist" in err


def test_meta_train_with_skipped_steps_writes_null_not_nan_into_metrics(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}

    def flaky_accumulate(self, params, tasks, scale=1.0):
        calls["n"] += 1
        stats = orig_accumulate(self, params, tasks, scale)
        if calls["n"] == 2:
            stats.nonfinite = "inner step 0: injected"
        return stats

    from gram_plugin.metastep import MetaStep

    orig_accumulate = MetaStep.accumulate_gradients
    monkeypatch.setattr(MetaStep, "accumulate_gradients", flaky_accumulate)
    rc, err = cli(capsys, "meta-train", "--out", tmp_path / "m", *BASE, *META[2:], "--meta-steps", "3",
                  "--on-nonfinite", "skip")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert [r["meta_loss"] is None for r in metrics["meta_train"]] == [False, True, False]
    assert metrics["skipped_steps"] == [2]
