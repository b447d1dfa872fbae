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


def image_folder(tmp_path, classes=("Faces", "pizza", "Leopards", "Motorbikes"), per_class=4) -> Path:
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


def test_demo_with_an_exploding_lr_stops_and_writes_no_result(tmp_path, capsys, trained):
    # the tiny backbone needs a corpus init of its own (the shipped one is ProxyCLIP v2's)
    rc, err = cli(capsys, "demo", "--out", tmp_path / "d", *FAST, *META, "--lr", "1e30",
                  "--corpus-init", trained / "m" / "init.safetensors")
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
    assert rc == 2 and "is not empty" in err and "--overwrite" in err and "--resume" not in err  # tune has no --resume
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
    assert rc == 2 and "images: its 1 class split into 1 base and 0 new; base-to-new evaluation needs at least 2" in err
    assert not (tmp_path / "t").exists()


def test_empty_class_folders_are_warned_about_and_left_out(tmp_path):
    from gram_plugin.data import image_folder as load_folder

    root = image_folder(tmp_path, classes=("Faces", "pizza"))
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

    def flaky_accumulate(self, params, tasks, scale=1.0, **progress):
        calls["n"] += 1
        stats = orig_accumulate(self, params, tasks, scale, **progress)
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


# ---------------------------------------------------------------------------------------------------
# Issue 27: nothing a user already has is destroyed, and no result is silently wrong. One test per case.
# ---------------------------------------------------------------------------------------------------
import gzip  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

from gram_plugin.cache import FeatureCache, cache_key  # noqa: E402
from gram_plugin.data import DataError, ImageDataset, Item  # noqa: E402
from gram_plugin.prompts import PromptInitError  # noqa: E402
from gram_plugin.safeio import CacheError  # noqa: E402


class _HalfRegression:
    """ShiftedRegression in float16 (prompts, inputs and targets)."""

    def __init__(self, n_support=10):
        from test_meta_training import ShiftedRegression

        self.inner = ShiftedRegression(n_support=n_support)

    def sample(self, g):
        t = self.inner.sample(g)
        t.support = tuple(x.half() for x in t.support)
        t.query = tuple(x.half() for x in t.query)
        return t


def _set_metadata(src: Path, dst: Path, **changes) -> Path:
    """Rewrite a gram-plugin safetensors file with metadata changes, checksums left as they were."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["gram_plugin"])
    meta.update(changes)
    header["gram_plugin"] = json.dumps(meta)
    save_file(tensors, str(dst), metadata=header)
    return dst


# -- silent wrong results: meta-training checks its last update, every dtype --------------------------
def test_meta_train_checks_its_last_update(tmp_path, capsys):
    rc, err = cli(capsys, "meta-train", "--out", tmp_path / "m", *BASE, *META[2:], "--meta-steps", "1",
                  "--outer-lr", "1e30")
    assert rc == 2 and re.search(r"outer step 1: the update made the prompts unusable", err), err
    assert not (tmp_path / "m" / "init.safetensors").exists() and not (tmp_path / "m" / "metrics.json").exists()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_float16_prompts_that_overflow_stop_at_the_update_and_save_nothing(tmp_path, steps, on_nonfinite):
    from test_meta_training import mse

    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, outer_lr=1e5, meta_batch_size=2, steps=steps, progress=False,
                     checkpoint_every=1, on_nonfinite=on_nonfinite)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8, dtype=torch.float16)}, config=cfg, run_dir=tmp_path)
    with pytest.raises(MetaTrainingError, match=r"outer step 1: the update made \['w'\] non-finite"):
        tr.fit(_HalfRegression())
    assert not (tmp_path / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_init_is_refused_in_every_dtype(dtype, value):
    from test_meta_training import ShiftedRegression, mse

    w = torch.zeros(1, 8, dtype=dtype)
    w[0, 3] = value
    tr = MetaPromptTrainer(mse, {"w": w}, config=MetaConfig(steps=2, progress=False))
    with pytest.raises(MetaTrainingError, match=r"init holds non-finite values \(NaN or Inf\) in \['w'\]"):
        tr.fit(ShiftedRegression())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_checkpoint_holding_non_finite_values_is_neither_written_nor_resumed(tmp_path, dtype):
    from test_meta_training import ShiftedRegression, mse

    source = _HalfRegression() if dtype == torch.float16 else ShiftedRegression()
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, meta_batch_size=2, steps=2, progress=False)
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8, dtype=dtype)}, config=cfg, run_dir=tmp_path)
    tr.fit(source)
    tensors, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    tensors["theta/w"] = tensors["theta/w"].clone().fill_(float("inf"))
    for name in (CHECKPOINT_NAME, "checkpoint.prev.safetensors"):
        save_tensors(tmp_path / name, tensors, meta)  # checksums recomputed: only the values say it
    again = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8, dtype=dtype)}, config=MetaConfig(**{**cfg.__dict__, "steps": 4}),
                              run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or Inf\) in \['theta/w'\]"):
        again.fit(source, resume=True)
    with torch.no_grad():
        tr.params["w"].fill_(float("nan"))
    with pytest.raises(MetaTrainingError, match=r"non-finite values \(NaN or Inf\) in \['w'\]: no checkpoint written"):
        tr.save_checkpoint(tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()


# -- checkpoint integrity covers the header -----------------------------------------------------------
@pytest.mark.parametrize("what", ["optimiser lr", "options", "skipped steps"])
def test_an_edited_checkpoint_header_is_caught(tmp_path, what):
    tr, _ = _checkpointed_run(tmp_path, 2)
    _, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    if what == "optimiser lr":
        meta["opt_theta"]["param_groups"][0]["lr"] = 0.5
        change = {"opt_theta": meta["opt_theta"]}
    elif what == "options":
        change = {"config": {**meta["config"], "inner_lr": 0.5}}
    else:
        change = {"skipped_steps": [1]}
    for name in (CHECKPOINT_NAME, "checkpoint.prev.safetensors"):
        _set_metadata(tmp_path / name, tmp_path / name, **change)
    with pytest.raises(CheckpointError, match=r"is damaged: checksum mismatch in its metadata"):
        _checkpointed_run(tmp_path, 4)


def test_a_checkpoint_written_with_other_options_is_refused_even_with_fresh_checksums(tmp_path):
    _checkpointed_run(tmp_path, 2)
    tensors, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    meta["opt_theta"]["param_groups"][0]["lr"] = 0.5
    meta["config"]["inner_lr"] = 0.5
    for name in (CHECKPOINT_NAME, "checkpoint.prev.safetensors"):
        save_tensors(tmp_path / name, tensors, meta)
    with pytest.raises(CheckpointError, match=r"inner_lr 0.5 .* this trainer has 0.05.*optimiser 'opt_theta' lr 0.5"):
        _checkpointed_run(tmp_path, 4)


# -- the feature cache is keyed on content and row order ----------------------------------------------
def _bmp_dataset(tmp_path, bb, n=6) -> ImageDataset:
    """Uncompressed BMP copies of package images: a pixel can change without the file size changing."""
    from PIL import Image

    src = sorted((PACKAGE_IMAGES / "Faces").iterdir())[:n // 2] + sorted((PACKAGE_IMAGES / "pizza").iterdir())[:n // 2]
    items = []
    for i, p in enumerate(src):
        dst = tmp_path / "bmp" / f"{i}.bmp"
        dst.parent.mkdir(exist_ok=True)
        with Image.open(p) as im:
            im.convert("RGB").save(dst)
        items.append(Item(str(dst), int(i >= n // 2)))
    return ImageDataset(items, ["face", "pizza"], bb.preprocess, "bmp")


def test_the_feature_cache_sees_an_image_changed_at_the_same_size_and_mtime(tmp_path, bb):
    ds = _bmp_dataset(tmp_path, bb)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    before = cache.features(bb, ds)
    path = ds.items[0].path
    st = os.stat(path)
    raw = bytearray(Path(path).read_bytes())
    for i in range(len(raw) - 3000, len(raw)):  # a band of pixels turns white
        raw[i] = 255
    Path(path).write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    after = cache.features(bb, ds)
    assert cache.misses == 2 and not torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1:], before[1:])


@pytest.mark.parametrize("damage", ["reordered", "flipped byte", "nan rows"])
def test_a_damaged_or_reordered_feature_cache_is_named_and_recomputed(tmp_path, bb, damage):
    ds = _bmp_dataset(tmp_path, bb)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    good = cache.features(bb, ds)
    path = cache.path_for(cache_key(bb, ds)[0])
    tensors, meta = load_tensors(path)
    if damage == "reordered":
        save_tensors(path, {"features": tensors["features"][torch.tensor([1, 0, 2, 3, 4, 5])]}, meta)
        message = "rows do not match its images .*reordered"
    elif damage == "nan rows":
        save_tensors(path, {"features": tensors["features"].clone().fill_(float("nan"))}, meta)
        message = r"non-finite values \(NaN or Inf\)"
    else:
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0x20
        path.write_bytes(bytes(raw))
        message = "checksum mismatch"
    with pytest.warns(UserWarning, match=rf"feature cache {re.escape(str(path))} .*{message}.*: recomputing"):
        again = cache.features(bb, ds)
    assert cache.misses == 2 and torch.equal(again, good)


def test_a_nan_feature_cache_on_the_cli_is_recomputed_not_blamed_on_the_learning_rate(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["tune", "--out", str(tmp_path / "a"), *FAST, "--cache-dir", str(cache)]) == 0
    path = next(cache.glob("features-*.safetensors"))
    tensors, meta = load_tensors(path)
    save_tensors(path, {"features": torch.full_like(tensors["features"], float("nan"))}, meta)
    with pytest.warns(UserWarning, match=rf"feature cache {re.escape(str(path))} .*non-finite"):
        rc, err = cli(capsys, "tune", "--out", tmp_path / "b", *FAST, "--cache-dir", cache)
    assert rc == 0 and "learning rate" not in err, err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == json.loads((tmp_path / "a" / "metrics.json").read_text())


def test_an_image_tower_giving_non_finite_features_is_named(tmp_path, bb):
    ds = _bmp_dataset(tmp_path, bb)

    class Broken:
        name, embed_dim, preprocess = "broken", 32, bb.preprocess

        def weights_id(self):
            return "broken"

        def encode_image(self, images):
            out = torch.zeros(len(images), 32)
            out[1] = float("nan")
            return out

    with pytest.raises(CacheError, match=r"image tower broken gave non-finite features for 1 of 6 images of bmp .*1\.bmp"):
        FeatureCache(tmp_path / "cache", progress=False).features(Broken(), ds)
    assert not list((tmp_path / "cache").glob("*.safetensors"))


# -- datasets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes, counts", [(("Faces", "pizza"), "1 base and 1 new"),
                                             (("Faces", "pizza", "Leopards"), "2 base and 1 new")])
def test_a_base_new_split_with_fewer_than_2_classes_on_a_side_is_refused(tmp_path, classes, counts):
    from gram_plugin.data import image_folder as load_folder, subsample_classes

    ds = load_folder(image_folder(tmp_path, classes=classes))
    for part in ("base", "new"):
        with pytest.raises(DataError, match=f"its {len(classes)} classes split into {counts}; base-to-new evaluation "
                                            "needs at least 2 classes on each side"):
            subsample_classes(ds, part)


def _imagenet_layout(tmp_path, lines: bytes, folders: dict) -> Path:
    root = tmp_path / "inet"
    (root / "images" / "train").mkdir(parents=True)
    (root / "classnames.txt").write_bytes(lines)
    sources = sorted(PACKAGE_IMAGES.iterdir())
    for k, (wnid, n) in enumerate(folders.items()):
        (root / "images" / "train" / wnid).mkdir()
        for p in sorted(sources[k % len(sources)].iterdir())[:n]:
            shutil.copy(p, root / "images" / "train" / wnid / p.name)
    return root


def test_imagenet_layout_leaves_out_empty_class_folders_and_nameless_classes(tmp_path):
    from gram_plugin.data import imagenet

    root = _imagenet_layout(tmp_path, b"n1 ant\nn2 bee\nn3\nn4 cat\nn5 dog\nn6   \n",
                            {"n1": 2, "n2": 2, "n3": 2, "n4": 0, "n5": 2, "n6": 2})
    with pytest.warns(UserWarning) as record:
        ds = imagenet(root)
    text = " | ".join(str(w.message) for w in record)
    assert "1 class folders hold no images and are left out: ['n4']" in text
    assert "gives no name for 2 classes, left out: ['n3', 'n6']" in text
    assert ds.classnames == ["ant", "bee", "dog"] and len(ds) == 6


def test_image_folder_leaves_out_nameless_classes(tmp_path):
    from gram_plugin.data import image_folder as load_folder

    root = image_folder(tmp_path, classes=("Faces", "pizza"))
    shutil.copytree(root / "pizza", root / "__")
    with pytest.warns(UserWarning, match=r"class folders whose name is empty once '_' become spaces are left out: \['__'\]"):
        ds = load_folder(root)
    assert ds.classnames == ["Faces", "pizza"] and len(ds) == 8


def test_a_non_utf8_classnames_txt_is_named(tmp_path, capsys):
    root = _imagenet_layout(tmp_path, "n1 caf\xe9\nn2 bee\n".encode("latin-1"), {"n1": 2, "n2": 2})
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--data", f"imagenet:{root}")
    assert rc == 2 and f"{root / 'classnames.txt'} is not UTF-8 text" in err and "line 1" in err, err


@pytest.mark.parametrize("spec", ["folder:", "caltech101:", "imagenet:", "folder:  "])
def test_an_empty_data_root_is_refused(tmp_path, capsys, monkeypatch, spec):
    monkeypatch.chdir(image_folder(tmp_path))  # the current folder is a valid image folder: it must not be used
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--data", spec)
    assert rc == 2 and f"{spec!r} names no folder after the ':'" in err and "$DATA" in err, err
    assert not (tmp_path / "t").exists()


# -- an init's regulator is checked before anything is allocated or written -----------------------------
def _regulator_init(src: Path, dst: Path, case: str) -> Path:
    init = PromptInit.load(src)
    rc = dict(init.regulator_config)
    if case == "30000-wide head":
        rc["shapes"] = {"ctx": [4, 30000]}
    elif case == "head for no prompt":
        rc["shapes"] = {**rc["shapes"], "other": [4, 32]}
    elif case == "rank not a number":
        rc["rank"] = "two"
    elif case == "tensor of another shape":
        key = next(k for k in init.regulator_state if k.endswith("gamma.weight"))
        init.regulator_state[key] = torch.zeros(8, 8)
    elif case == "tensor missing":
        key = next(k for k in init.regulator_state if k.endswith("beta.bias"))
        del init.regulator_state[key]
    elif case == "no config":
        rc = None
    init.metadata["regulator_config"] = rc
    if rc is None:
        del init.metadata["regulator_config"]
    return init.save(dst)


@pytest.fixture
def heads_built(monkeypatch) -> list:
    """(width, device type) of every regulator head built while the test runs."""
    import gram_plugin.regulator as regulator_module

    built = []
    real_head = regulator_module._Head.__init__

    def spy(self, width, *a, **k):
        built.append((width, torch.empty(0).device.type))
        real_head(self, width, *a, **k)

    monkeypatch.setattr(regulator_module._Head, "__init__", spy)
    return built


REGULATOR_CASES = ["30000-wide head", "head for no prompt", "rank not a number", "tensor of another shape",
                   "tensor missing", "no config"]


@pytest.mark.parametrize("case", REGULATOR_CASES)
def test_an_init_whose_regulator_does_not_fit_is_refused_before_anything_is_allocated(tmp_path, trained, heads_built,
                                                                                      case):
    built = heads_built
    bad = _regulator_init(trained / "m" / "init.safetensors", tmp_path / "bad.safetensors", case)
    with pytest.raises(PromptInitError, match="regulator") as e:
        GradientRegulator.from_init(_unchecked(bad))  # what an API caller may build, past PromptInit.load's checks
    assert not [w for w, device in built if device != "meta"], built  # checked on the meta device: nothing allocated
    if case in ("30000-wide head", "no config"):  # the file's own metadata says it
        with pytest.raises(PromptInitError, match=f"init file {re.escape(str(bad))} has a regulator that does not fit"):
            PromptInit.load(bad)
    else:
        with pytest.raises(PromptInitError, match=f"init file {re.escape(str(bad))}: its regulator does not fit"):
            GradientRegulator.from_init(PromptInit.load(bad))
    assert str(e.value).count("regulator") >= 1


def _unchecked(path):
    """The init as the file holds it, past PromptInit.load's checks."""
    tensors, meta = load_tensors(path)
    prompts = {n: tensors[n] for n in meta["names"]}
    reg = {k[len("regulator."):]: v for k, v in tensors.items() if k.startswith("regulator.")}
    md = {k: v for k, v in meta.items() if k in ("regulator_config", "mode", "backbone")}
    return PromptInit(prompts, md, reg)


# -- oversized images ---------------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb: no pixels need decoding to see it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_oversized_image_is_named_and_can_be_skipped(tmp_path, capsys):
    root = image_folder(tmp_path)
    bomb = _png_header_only(root / "pizza" / "bomb.png", 20000, 20000)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "a", *FAST, "--data", f"folder:{root}")
    assert rc == 2 and f"cannot read image {bomb}" in err and "400,000,000 pixels" in err and "--skip-unreadable" in err, err
    assert "Traceback" not in err
    rc, err = cli(capsys, "tune", "--out", tmp_path / "b", *FAST, "--data", f"folder:{root}", "--skip-unreadable")
    assert rc == 0, err
    assert "left out 1 unreadable images (--skip-unreadable)" in (tmp_path / "b" / "log.txt").read_text()


# -- the gradient hook ----------------------------------------------------------------------------------
def test_a_second_gradient_hook_on_the_same_parameters_is_refused():
    from gram_plugin import install_gradient_transform, regulate

    p = torch.nn.Parameter(torch.ones(1, 4))
    q = torch.nn.Parameter(torch.ones(1, 4))
    opt = torch.optim.SGD([p, q], lr=1.0)
    reg = GradientRegulator({"p": (1, 4)}, init_gain=0.5)
    hook = install_gradient_transform(opt, {"p": p}, regulate(reg))
    with pytest.raises(ValueError, match=r"a gradient transform is already installed on this optimiser for \['p'\]"):
        install_gradient_transform(opt, {"p": p, "q": q}, regulate(reg))
    install_gradient_transform(opt, {"q": q}, clip_meta(1.0))  # other parameters: fine
    p.sum().backward()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((1, 4), 0.5))  # regulated once, not twice
    hook.remove()
    install_gradient_transform(opt, {"p": p}, regulate(reg))  # removed: may be installed again


# -- artefacts respect the umask --------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_artefacts_respect_the_umask(tmp_path, umask, mode):
    from gram_plugin.safeio import atomic_write_text

    old = os.umask(umask)
    try:
        save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {})
        atomic_write_text(tmp_path / "x.txt", "hi")
        assert main(["meta-train", "--out", str(tmp_path / "m"), *BASE, *META]) == 0
    finally:
        os.umask(old)
    files = [tmp_path / "x.safetensors", tmp_path / "x.txt"]
    files += [p for p in (tmp_path / "m").rglob("*") if p.is_file() and p.name != ".lock"]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(mode)}, modes


# -- errors name their file or flag -------------------------------------------------------------------------
def test_metadata_nested_100000_deep_is_named(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    save_file({"ctx": torch.zeros(4, 32)}, str(path), metadata={"gram_plugin": "[" * 100_000 + "]" * 100_000})
    rc, err = cli(capsys, "inspect", path)
    assert rc == 2 and f"init file {path} has corrupt gram-plugin metadata" in err and "nested" in err, err
    with pytest.raises(PromptInitError, match="nested"):
        PromptInit.load(path)


@pytest.mark.parametrize("command", ["tune", "meta-train"])
def test_a_seed_out_of_range_names_the_flag(tmp_path, capsys, command):
    rc, err = cli(capsys, command, "--out", tmp_path / "t", *BASE, "--seed", 10 ** 23)
    assert rc == 2 and "--seed must be an integer in [0, 2**63)" in err and "100000000000000000000000" in err, err
    assert not (tmp_path / "t").exists()


def test_an_empty_task_is_named_not_blamed_on_a_non_finite_loss():
    from test_meta_training import ShiftedRegression, mse

    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, config=MetaConfig(steps=2, progress=False))
    with pytest.raises(MetaTrainingError, match="outer step 1: task 0 of the meta-batch has an empty support set") as e:
        tr.fit(ShiftedRegression(n_support=0))
    assert "non-finite" not in str(e.value)


# -- archives and caption files are named when they are unsafe or unreadable --------------------------------
def test_build_proxy_with_a_tar_reaching_outside_its_folder_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import io
    import tarfile

    data = tmp_path / "shared"
    data.mkdir()
    with tarfile.open(data / "caltech-101.tar", "w") as tf:
        for name, payload in (("caltech-101/ok.txt", b"fine"), ("../../escaped.txt", b"evil")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    monkeypatch.setenv("GRAM_DATA_CACHE", str(tmp_path / "cache" / "data"))
    monkeypatch.syspath_prepend(str(REPO / "tools"))  # the build script of the checkout (python tools/build_proxy.py)
    from build_proxy import cli_main

    capsys.readouterr()
    rc, err = cli_main(["--data", str(data), "--out", str(tmp_path / "proxy")]), capsys.readouterr().err
    assert rc == 2 and f"archive {data / 'caltech-101.tar'} is unsafe" in err and "../../escaped.txt" in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "cache" / "data" / "caltech-101").exists()  # nothing half-extracted left to trust


@pytest.mark.parametrize("case", ["latin-1 captions", "gz that is not gzip", "truncated gz"])
def test_a_captions_file_that_cannot_be_read_is_named(tmp_path, capsys, case):
    if case == "latin-1 captions":
        path = tmp_path / "captions.txt"
        path.write_bytes("img1.jpg#0\tun caf\xe9 en terrasse\n".encode("latin-1"))
        message = "is not UTF-8 text"
    elif case == "gz that is not gzip":
        path = tmp_path / "captions.txt.gz"
        path.write_text("img1.jpg#0\ta dog runs\n")
        message = "is not a gzip file"
    else:
        path = tmp_path / "captions.txt.gz"
        path.write_bytes(gzip.compress(b"img1.jpg#0\ta dog runs\n" * 200)[:60])
        message = "is not a gzip file"
    rc, err = cli(capsys, "chc", "--captions", path, "--out", tmp_path / "h.json", "--quiet")
    assert rc == 2 and f"captions file {path} {message}" in err, err
    assert "Traceback" not in err and not (tmp_path / "h.json").exists()


# -- resume keeps the whole history; Ctrl-C saves a resumable checkpoint (API; the CLI's tests are below) ----
def test_a_resumed_run_keeps_the_whole_history(tmp_path):
    _, ref = _checkpointed_run(tmp_path / "ref", 4)
    ref_losses = [r["meta_loss"] for r in _checkpointed_run(tmp_path / "ref2", 4)[0].history]
    _checkpointed_run(tmp_path / "cut", 2)
    tr, _ = _checkpointed_run(tmp_path / "cut", 4)  # mid-run resume: steps 3 and 4 run here
    assert [r["step"] for r in tr.history] == [1, 2, 3, 4]
    assert [r["meta_loss"] for r in tr.history] == pytest.approx(ref_losses, rel=1e-6)
    done, _ = _checkpointed_run(tmp_path / "cut", 4)  # a finished run resumed: nothing runs
    assert [r["step"] for r in done.history] == [1, 2, 3, 4]


@pytest.fixture
def interactive_sigint():
    """Ctrl-C as in a terminal: a background job (CI's runner, ``cmd &``) starts with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_in_meta_training_saves_a_resumable_checkpoint(tmp_path, interactive_sigint):
    from test_meta_training import ShiftedRegression, mse

    from gram_plugin.meta import MetaTrainingInterrupted

    _, ref = _checkpointed_run(tmp_path / "ref", 4)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=1, outer_lr=0.05, meta_batch_size=2, steps=4, seed=1,
                     checkpoint_every=0, progress=False)  # no periodic checkpoint: the interrupt writes it
    tr = MetaPromptTrainer(mse, {"w": torch.zeros(1, 8)}, regulator=GradientRegulator({"w": (1, 8)}), config=cfg,
                           run_dir=tmp_path / "cut")

    def ctrl_c_at_step_2(record):
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(MetaTrainingInterrupted, match=r"interrupted after outer step 2: checkpoint \S+ saved"):
        tr.fit(ShiftedRegression(), callback=ctrl_c_at_step_2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert load_tensors(tmp_path / "cut" / CHECKPOINT_NAME)[1]["step"] == 2
    _, got = _checkpointed_run(tmp_path / "cut", 4)
    assert torch.equal(got.tensors["w"], ref.tensors["w"])


# -- the CLI: cases that needed the CLI package ---------------------------------------------------------------
@pytest.mark.parametrize("classes, counts", [(("Faces", "pizza"), "1 base and 1 new"),
                                             (("Faces", "pizza", "Leopards"), "2 base and 1 new")])
def test_a_base_new_split_with_fewer_than_2_classes_on_a_side_is_refused_on_the_cli(tmp_path, capsys, classes, counts):
    root = image_folder(tmp_path, classes=classes)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--data", f"folder:{root}")
    assert rc == 2 and f"{len(classes)} classes split into {counts}" in err and "at least 2 classes on each side" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("case", REGULATOR_CASES)
def test_an_init_whose_regulator_does_not_fit_is_refused_on_the_cli_before_anything_is_written(tmp_path, capsys, trained,
                                                                                                heads_built, case):
    built = heads_built
    bad = _regulator_init(trained / "m" / "init.safetensors", tmp_path / "bad.safetensors", case)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", bad)
    assert rc == 2 and f"init file {bad}" in err and "regulator" in err, err
    assert not (tmp_path / "t").exists()
    assert not [w for w, device in built if device != "meta"], built  # nothing built for real




def test_a_seed_out_of_range_names_the_flag_in_eval(tmp_path, capsys):
    rc, err = cli(capsys, "eval", "--out", tmp_path / "t", *BASE, "--seed", 10 ** 23)
    assert rc == 2 and "--seed must be an integer in [0, 2**63)" in err and "100000000000000000000000" in err, err
    assert not (tmp_path / "t").exists()


def test_a_vpt_init_recording_0_prompt_tokens_names_the_file_not_a_flag(tmp_path, capsys, trained):
    init = PromptInit.load(trained / "m" / "init.safetensors")
    init.metadata.update(mode="vpt", n_vpt=0)
    path = init.save(tmp_path / "vpt.safetensors")
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--init", path)
    assert rc == 2 and f"init file {path}" in err and "n_vpt" in err and "--n-vpt" not in err, err


# -- the run folder: nothing the user has is destroyed -------------------------------------------------------



def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_failed_overwrite_keeps_the_previous_run_whole(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tune", "--out", str(out), *FAST]) == 0
    before = _files(out)
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--overwrite", "--lr", "1e30")
    assert rc == 2 and "non-finite" in err, err
    assert _files(out) == before  # prompt, metrics, plot, config and log as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # the attempt left nothing beside it
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--overwrite", "--lr", "0.5")
    assert rc == 0, err
    assert "lr: 0.5" in (out / "config.yaml").read_text() and (out / "prompt.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_overwrite_touches_only_a_folder_holding_a_gram_plugin_run(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "meta").mkdir(parents=True)
    (out / "meta" / "notes.md").write_text("my notes")
    (out / "config.yaml").write_text("my: config\n")
    (out / "log.txt").write_text("my log\n")
    before = _files(out)
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--overwrite")
    assert rc == 2 and f"--overwrite: {out} holds no gram-plugin run" in err, err
    assert _files(out) == before
    from gram_plugin.cli import CLIError, Run

    with pytest.raises(CLIError, match="holds no gram-plugin run"):  # checked again under the lock, not only by plan
        Run(str(out), {"command": "tune"}, overwrite=True)
    assert _files(out) == before


@pytest.mark.parametrize("command, offers_resume", [("tune", False), ("eval", False), ("meta-train", True)])
def test_the_not_empty_hint_offers_resume_only_to_meta_train(tmp_path, capsys, command, offers_resume):
    out = tmp_path / "r"
    out.mkdir()
    (out / "something.txt").write_text("x")
    extra = META if command == "meta-train" else []
    rc, err = cli(capsys, command, "--out", out, *BASE, *extra)
    assert rc == 2 and "is not empty" in err and "--overwrite" in err
    assert ("--resume" in err) == offers_resume, err


def test_resume_keeps_the_whole_meta_train_history_in_metrics(tmp_path, capsys):
    argv = ["meta-train", "--out", str(tmp_path / "m"), *BASE, *META[2:]]
    assert main([*argv, "--meta-steps", "2"]) == 0
    assert main([*argv, "--meta-steps", "4", "--resume"]) == 0  # mid-run resume: steps 3 and 4 here
    steps = lambda: [r["step"] for r in json.loads((tmp_path / "m" / "metrics.json").read_text())["meta_train"]]  # noqa: E731
    assert steps() == [1, 2, 3, 4]
    assert main([*argv, "--meta-steps", "4", "--resume"]) == 0  # a finished run resumed
    assert steps() == [1, 2, 3, 4]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _ctrl_c_during_meta_step_2(monkeypatch):
    """Ctrl-C while meta-training runs its outer step 2; returns the real ``outer_step`` (to put it back)."""
    from gram_plugin.meta import MetaPromptTrainer

    real_step = MetaPromptTrainer.outer_step

    def ctrl_c_during_step_2(self, tasks, **progress):
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)
        return real_step(self, tasks, **progress)

    monkeypatch.setattr(MetaPromptTrainer, "outer_step", ctrl_c_during_step_2)
    return real_step


def test_ctrl_c_in_meta_train_is_one_line_a_resumable_checkpoint_and_interrupted_in_the_log(tmp_path, capsys, monkeypatch, interactive_sigint):
    from gram_plugin.meta import MetaPromptTrainer

    argv = ["meta-train", *BASE, *META[2:], "--meta-steps", "4", "--checkpoint-every", "0"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    real_step = _ctrl_c_during_meta_step_2(monkeypatch)
    rc, err = cli(capsys, *argv, "--out", tmp_path / "cut")
    line = _one_line(err)
    assert rc == 130 and line.startswith("gram-plugin: interrupted") and "after outer step 2" in line and "--resume" in line
    assert "interrupted" in (tmp_path / "cut" / "log.txt").read_text()
    assert "FAILED: \n" not in (tmp_path / "cut" / "log.txt").read_text()
    monkeypatch.setattr(MetaPromptTrainer, "outer_step", real_step)
    rc, err = cli(capsys, *argv, "--out", tmp_path / "cut", "--resume")
    assert rc == 0, err
    a = PromptInit.load(tmp_path / "ref" / "init.safetensors")
    b = PromptInit.load(tmp_path / "cut" / "init.safetensors")
    assert torch.equal(a.tensors["ctx"], b.tensors["ctx"])


def _ctrl_c_in_evaluation(monkeypatch, at_call: int) -> None:
    """Ctrl-C while tune evaluates its ``at_call``-th epoch (as a user pressing it then)."""
    import gram_plugin.finetune as finetune

    real, calls = finetune.evaluate_base_new, []

    def ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(finetune, "evaluate_base_new", ctrl_c)


def test_ctrl_c_in_tune_keeps_the_prompt_so_far_as_a_partial_file_in_one_line(tmp_path, capsys, monkeypatch,
                                                                              interactive_sigint):
    """Ctrl-C during epoch 2 of 3: tuning stops after the evaluation in progress and the prompt of those 2 epochs is
    saved as prompt.partial.safetensors (never prompt.safetensors), equal to a 2-epoch run's; exit 130, one line."""
    argv = ["tune", *BASE, "--epochs", "3"]
    assert main([*argv[:-1], "2", "--out", str(tmp_path / "two")]) == 0
    _ctrl_c_in_evaluation(monkeypatch, at_call=2)
    rc, err = cli(capsys, *argv, "--out", tmp_path / "t")
    partial = tmp_path / "t" / "prompt.partial.safetensors"
    assert rc == 130 and _one_line(err) == (f"gram-plugin: interrupted: tuning interrupted after epoch 2 of 3; the "
                                            f"prompt learned so far is saved as {partial} (metrics.json marks the run "
                                            "interrupted)"), err
    assert not (tmp_path / "t" / "prompt.safetensors").exists()
    assert "interrupted" in (tmp_path / "t" / "log.txt").read_text()
    got, want = PromptInit.load(partial), PromptInit.load(tmp_path / "two" / "prompt.safetensors")
    assert torch.equal(got.tensors["ctx"], want.tensors["ctx"])
    assert got.metadata["interrupted"] == {"epoch": 2, "step": 0, "of_epochs": 3}
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["interrupted"] == {"epoch": 2, "step": 0, "of_epochs": 3} and len(metrics["per_epoch"]) == 2
    assert "final" not in metrics


def test_ctrl_c_in_an_overwriting_tune_saves_nothing_and_keeps_the_previous_run(tmp_path, capsys, monkeypatch,
                                                                               interactive_sigint):
    assert main(["tune", "--out", str(tmp_path / "t"), *FAST]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir() if p.is_file()}
    _ctrl_c_in_evaluation(monkeypatch, at_call=1)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--overwrite")
    assert rc == 130 and _one_line(err) == (f"gram-plugin: interrupted: nothing of the unfinished run was kept "
                                            f"(--overwrite keeps the previous run in {tmp_path / 't'} as it was)"), err
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_ctrl_c_in_an_overwriting_meta_train_offers_no_resume_of_a_checkpoint_it_discarded(tmp_path, capsys, monkeypatch,
                                                                                          interactive_sigint):
    """The new run's checkpoint goes with the unfinished run: the line says so instead of offering --resume
    (which would continue the previous run)."""
    argv = ["meta-train", *BASE, *META[2:], "--meta-steps", "4", "--checkpoint-every", "0", "--out", tmp_path / "m"]
    assert main([str(a) for a in argv]) == 0
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    _ctrl_c_during_meta_step_2(monkeypatch)
    rc, err = cli(capsys, *argv, "--overwrite")
    assert rc == 130 and _one_line(err) == (f"gram-plugin: interrupted: nothing of the unfinished run was kept "
                                            f"(--overwrite keeps the previous run in {tmp_path / 'm'} as it was)"), err
    assert {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ctrl_c_stops_tune_after_the_step_in_progress_and_a_second_at_once(tiny_clip, interactive_sigint):
    """The library: the first Ctrl-C ends the step it came in (the model keeps that step's prompt), a second one
    does not wait; the previous SIGINT handler is put back."""
    from gram_plugin.backbones import OpenCLIPBackbone
    from gram_plugin.data import default_dataset
    from gram_plugin.finetune import TuningInterrupted, tune
    from gram_plugin.models import PromptedCLIP

    model = PromptedCLIP(OpenCLIPBackbone(tiny_clip, name="tiny"))
    train = default_dataset(model.backbone.preprocess).subset(range(8))  # 4 steps of 2 images an epoch
    real_logits, seen = model.logits, []

    def ctrl_c_in_step_3(batch):
        seen.append(1)
        if len(seen) == 3:
            signal.raise_signal(signal.SIGINT)
        return real_logits(batch)

    model.logits = ctrl_c_in_step_3
    with pytest.raises(TuningInterrupted, match="tuning interrupted at epoch 1, step 3 of 2") as stopped:
        tune(model, train, epochs=2, batch_size=2, progress=False)
    assert (stopped.value.epoch, stopped.value.step, stopped.value.history) == (1, 3, [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def ctrl_c_twice(batch):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the second Ctrl-C should have stopped the step")

    model.logits = ctrl_c_twice
    with pytest.raises(KeyboardInterrupt) as stopped:
        tune(model, train, epochs=2, batch_size=2, progress=False)
    assert type(stopped.value) is KeyboardInterrupt  # not TuningInterrupted: the second Ctrl-C did not wait


@pytest.mark.parametrize("text, option", [("data: 5\n", "data"), ("init: 5\n", "init"), ("backbone: [1, 2]\n", "backbone"),
                                          ("skip_unreadable: 3\n", "skip_unreadable")])
def test_a_config_value_of_the_wrong_type_is_named_not_a_traceback(tmp_path, capsys, text, option):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, err = cli(capsys, "tune", "--out", tmp_path / "t", *FAST, "--config", cfg)
    assert rc == 2 and f"config {cfg}: {option} must be" in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists()


def test_build_proxy_refuses_an_out_folder_holding_other_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "proxy.safetensors").write_bytes(b"my own weights")
    monkeypatch.syspath_prepend(str(REPO / "tools"))  # the build script of the checkout (python tools/build_proxy.py)
    from build_proxy import cli_main

    capsys.readouterr()
    rc, err = cli_main(["--out", str(out), "--data", str(tmp_path / "nowhere")]), capsys.readouterr().err
    assert rc == 2 and f"--out {out} holds files but no proxy build (no card.json)" in err, err
    assert (out / "proxy.safetensors").read_bytes() == b"my own weights"


def test_a_folder_holding_only_a_failed_run_without_artefacts_is_reused_without_flags(tmp_path, capsys):
    out = tmp_path / "t"
    rc, err = cli(capsys, "tune", "--out", out, *FAST, "--lr", "1e30")  # fails after its config, log and cache
    assert rc == 2 and not (out / "prompt.safetensors").exists()
    rc, err = cli(capsys, "tune", "--out", out, *FAST)
    assert rc == 0, err
    log = (out / "log.txt").read_text()
    assert "FAILED: " in log and log.index("FAILED: ") < log.rindex("epoch 1:")  # the failed run's log kept, appended to
    (out / "prompt.safetensors").unlink()
    (out / "metrics.json").unlink()
    (out / "notes.txt").write_text("mine")  # anything else there: refused as before
    rc, err = cli(capsys, "tune", "--out", out, *FAST)
    assert rc == 2 and "is not empty" in err and (out / "notes.txt").read_text() == "mine"
