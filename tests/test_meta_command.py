"""``gram-plugin meta-train --dassl-config``: meta-train an init through the user's own Dassl trainer.

The first tests need no Dassl: the errors a user meets before anything runs, all found before the
fork, Dassl or any model is loaded (a fake fork whose ``train.py`` leaves a mark when it runs). The
integration tests run the command on the real KaiyangZhou/CoOp fork (``GRAM_COOP_ROOT``, ``dassl``
importable), with CoOp's ``load_clip_to_cpu`` replaced by a tiny random CLIP built with CoOp's own
``clip.model.CLIP`` (no pretrained weights offline), on the shared Caltech101.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gram_plugin.cli import main
from gram_plugin.cli.options import RENAMED

COOP_ROOT = os.environ.get("GRAM_COOP_ROOT")
SMALL = ["--meta-steps", "4", "--meta-batch-size", "2", "--inner-steps", "1", "--n-way", "3", "--k-support", "1",
         "--k-query", "2", "--shots", "4", "--quiet", "--threads", "1"]
TINY_OPTS = ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]


def command(fork, root, out, *extra, trainer="CoOp", config="vit_b16_ctxv1.yaml"):
    return ["meta-train", "--dassl-config", str(Path(fork) / "configs/trainers" / trainer / config),
            "--dataset-config", str(Path(fork) / "configs/datasets/caltech101.yaml"), "--trainer", trainer,
            "--fork", str(fork), "--root", str(root), "--out", str(out), *SMALL, *extra, *TINY_OPTS]


@pytest.fixture
def fake_fork(tmp_path):
    """A fork's files (train.py, the two yaml files) whose train.py leaves ``ran`` behind when it is imported."""
    fork = tmp_path / "fork"
    (fork / "configs/trainers/CoOp").mkdir(parents=True)
    (fork / "configs/datasets").mkdir(parents=True)
    (fork / "configs/trainers/CoOp/vit_b16_ctxv1.yaml").write_text("TRAINER:\n  COOP:\n    N_CTX: 4\n")
    (fork / "configs/datasets/caltech101.yaml").write_text("DATASET:\n  NAME: Caltech101\n")
    (fork / "train.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    return fork


def test_meta_steps_0_fails_in_under_2_s_before_the_fork_or_any_model_is_loaded(fake_fork, tmp_path, capsys, monkeypatch):
    import gram_plugin.cli.dassl as dassl_path

    loaded = []
    monkeypatch.setattr(dassl_path, "load_fork", lambda fork: loaded.append(fork))
    argv = command(fake_fork, tmp_path, tmp_path / "run", "--meta-steps", "0")
    start = time.perf_counter()
    assert main(argv) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "--meta-steps must be an integer >= 1, got 0" in err
    assert seconds < 2, seconds
    assert not loaded and not (fake_fork / "ran").exists() and not (tmp_path / "run").exists()


def test_meta_steps_0_fails_as_a_process_before_torch_is_imported(fake_fork, tmp_path):
    """The same refusal from a fresh interpreter: every check runs before torch (and so any model) is
    imported, which is what makes the command fail at once (its wall time: a benchmark's business)."""
    argv = command(fake_fork, tmp_path, tmp_path / "run", "--meta-steps", "0")
    report = ("import json, sys\nfrom gram_plugin.cli import main\nstatus = main(sys.argv[1:])\n"
              "print(json.dumps({'torch imported': 'torch' in sys.modules}))\nsys.exit(status)")
    done = subprocess.run([sys.executable, "-c", report, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--meta-steps must be an integer >= 1, got 0" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"torch imported": False}
    assert not (fake_fork / "ran").exists() and not (tmp_path / "run").exists()


def test_missing_dassl_names_the_extra(fake_fork, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dassl", None)  # as if Dassl were not installed
    assert main(command(fake_fork, tmp_path, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "needs Dassl.pytorch (dassl is not installed)" in err and 'gram-plugin[dassl]' in err
    assert "Traceback" not in err and not (fake_fork / "ran").exists()


def test_every_problem_is_listed_before_anything_runs(fake_fork, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "init.safetensors").write_bytes(b"keep me")
    argv = command(fake_fork, tmp_path / "no-data", out, "--k-support", "0", "--backbone", "tiny")
    argv[argv.index("--dataset-config") + 1] = str(tmp_path / "missing.yaml")
    assert main(argv + ["OPTIM.MAX_EPOCH"]) == 2
    err = capsys.readouterr().err
    for problem in ("--dataset-config", "missing.yaml does not exist", "--root", "--k-support must be an integer >= 1",
                    "--backbone belongs to the standalone model", "KEY VALUE pairs", "is not empty"):
        assert problem in err, problem
    assert (out / "init.safetensors").read_bytes() == b"keep me" and not (fake_fork / "ran").exists()


def test_fork_without_train_py(fake_fork, tmp_path, capsys):
    (fake_fork / "train.py").unlink()
    assert main(command(fake_fork, tmp_path, tmp_path / "run")) == 2
    assert "no train.py there" in capsys.readouterr().err


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_earlier_flag_fails_naming_its_successor(fake_fork, tmp_path, capsys, old):
    assert main(command(fake_fork, tmp_path, tmp_path / "run", old)) == 2
    new = {"--steps": "--meta-steps", "--meta-batch": "--meta-batch-size", "--run-dir": "OUT/meta",
           "--no-progress": "--quiet", "--no-regulator": "--method maml", "--regulator": "--method gram"}[old]
    assert new in capsys.readouterr().err.splitlines()[-1]


def test_out_names_a_run_folder_not_the_init_file(fake_fork, tmp_path, capsys):
    assert main(command(fake_fork, tmp_path, tmp_path / "init.safetensors")) == 2
    assert "--out names a run folder now; the init is written to OUT/init.safetensors" in capsys.readouterr().err


def test_dassl_flags_are_refused_without_dassl_config(tmp_path, capsys):
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--trainer", "CoOp", "--no-image-cache",
                 "OPTIM.MAX_EPOCH", "1"]) == 2
    err = capsys.readouterr().err
    assert "--trainer needs --dassl-config" in err and "--no-image-cache needs --dassl-config" in err
    assert "trailing KEY VALUE config options need --dassl-config" in err


def test_help_shows_one_set_of_flags_for_both_paths(capsys):
    with pytest.raises(SystemExit):
        main(["meta-train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--dassl-config", "--backbone", "--meta-steps", "--meta-batch-size", "--n-way", "--shots", "--method",
                 "--clip-gamma", "--checkpoint-every", "--quiet", "--resume"):
        assert flag in text, flag
    assert "--steps " not in text and "--run-dir" not in text and "--no-progress" not in text


# -- on the real CoOp fork ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coop_fork():
    pytest.importorskip("dassl", reason="Dassl.pytorch is not installed")
    if not COOP_ROOT or not (Path(COOP_ROOT) / "trainers" / "coop.py").exists():
        pytest.skip("set GRAM_COOP_ROOT to a KaiyangZhou/CoOp checkout")
    if COOP_ROOT not in sys.path:
        sys.path.insert(0, COOP_ROOT)
    import trainers.coop

    def tiny_clip(cfg=None):
        from clip.model import CLIP, convert_weights

        torch.manual_seed(0)
        model = CLIP(32, 32, 2, 64, 8, 77, 49408, 32, 2, 2)
        convert_weights(model)
        return model.eval()

    saved = trainers.coop.load_clip_to_cpu
    trainers.coop.load_clip_to_cpu = tiny_clip
    yield Path(COOP_ROOT)
    trainers.coop.load_clip_to_cpu = saved


@pytest.fixture(scope="module")
def data_root(caltech_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("coop_data")  # CoOp writes its split files next to the images
    (root / "caltech-101").mkdir()
    (root / "caltech-101" / "101_ObjectCategories").symlink_to(caltech_root / "caltech-101" / "101_ObjectCategories")
    return root


@pytest.mark.integration
def test_meta_train_through_coop_then_wrap_and_train(coop_fork, data_root, tmp_path, capsys):
    from gram_plugin import GradientRegulator, PromptInit
    from gram_plugin.adapters import add_gram_cfg, wrap
    from gram_plugin.adapters.compat import patch_dassl

    run = tmp_path / "runs" / "coop"
    assert main(command(coop_fork, data_root, run, "--checkpoint-every", "2")) == 0
    out = run / "init.safetensors"
    printed = capsys.readouterr().out
    assert f'wrap(trainer, init="{out}", regulator=True)' in printed
    init = PromptInit.load(out)
    assert list(init.tensors) == ["prompt_learner.ctx"] and init.tensors["prompt_learner.ctx"].shape == (4, 32)
    assert init.metadata["method_name"] == "GRAM-CoOp" and init.metadata["meta_steps"] == 4
    assert init.metadata["source_tasks"] == {"kind": "n-way-k-shot", "dataset": "Caltech101", "n_way": 3, "k_support": 1, "k_query": 2}
    assert GradientRegulator.from_init(init) is not None
    assert (run / "meta" / "checkpoint.safetensors").exists() and (run / "config.yaml").exists()
    assert json.loads((run / "metrics.json").read_text())["meta_steps"] == 4

    # the three lines, on a trainer built as the fork's train.py builds it (fp16, GRAM from the cfg too)
    import importlib.util

    from dassl.config import get_cfg_default
    from dassl.engine import build_trainer

    spec = importlib.util.spec_from_file_location("coop_train", coop_fork / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    patch_dassl()
    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    add_gram_cfg(cfg)
    cfg.merge_from_file(str(coop_fork / "configs/datasets/caltech101.yaml"))
    cfg.merge_from_file(str(coop_fork / "configs/trainers/CoOp/vit_b16_ctxv1.yaml"))
    cfg.merge_from_list(["TRAINER.NAME", "CoOp", "DATASET.ROOT", str(data_root), "OUTPUT_DIR", str(tmp_path / "train"), "DATASET.NUM_SHOTS", "1",
                         "DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "1", "USE_CUDA", "False",
                         "TEST.NO_TEST", "True", "TRAINER.COOP.PREC", "fp32", *TINY_OPTS])
    cfg.freeze()
    trainer = build_trainer(cfg)
    handle = wrap(trainer, init=str(out), regulator=True)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), init.tensors["prompt_learner.ctx"])
    trainer.train()
    assert handle.hooks[0].steps == len(trainer.train_loader_x)
    assert not torch.equal(trainer.model.prompt_learner.ctx.detach(), init.tensors["prompt_learner.ctx"])


@pytest.mark.integration
def test_resumed_run_ends_where_an_uninterrupted_one_does(coop_fork, data_root, tmp_path):
    from gram_plugin import PromptInit

    whole = tmp_path / "whole"
    assert main(command(coop_fork, data_root, whole, "--method", "maml")) == 0
    part = tmp_path / "part"
    first = command(coop_fork, data_root, part, "--method", "maml", "--checkpoint-every", "1")
    first[first.index("--meta-steps") + 1] = "2"
    assert main(first) == 0
    assert PromptInit.load(part / "init.safetensors").metadata["meta_steps"] == 2
    assert main(command(coop_fork, data_root, part, "--method", "maml", "--checkpoint-every", "1", "--resume")) == 0
    resumed, uninterrupted = PromptInit.load(part / "init.safetensors"), PromptInit.load(whole / "init.safetensors")
    assert resumed.metadata["meta_steps"] == 4 and resumed.metadata["method_name"] == "MP-CoOp+clip"
    assert torch.equal(resumed.tensors["prompt_learner.ctx"], uninterrupted.tensors["prompt_learner.ctx"])


@pytest.mark.integration
def test_per_dataset_tasks_maml_clip(coop_fork, data_root, tmp_path):
    from gram_plugin import GradientRegulator, PromptInit

    out = tmp_path / "maml_clip"
    argv = command(coop_fork, data_root, out, "--tasks", "per-dataset", "--method", "maml")
    argv[argv.index("--meta-steps") + 1] = "1"
    argv[argv.index("--meta-batch-size") + 1] = "1"
    assert main(argv) == 0
    init = PromptInit.load(out / "init.safetensors")
    assert init.metadata["method_name"] == "MP-CoOp+clip" and GradientRegulator.from_init(init) is None
    assert init.metadata["source_tasks"] == {"kind": "per-dataset", "datasets": ["Caltech101"], "shots": 4, "k_support": 1}


def test_images_decoded_once_equal_the_per_access_transform():
    from torchvision import transforms as T

    from gram_plugin.cli.dassl import decoded_once_dataset
    from gram_plugin.data import default_dataset

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    plain = default_dataset(T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(40),
                                       T.ToTensor(), T.Normalize(mean, std)]))
    cached = decoded_once_dataset(plain.items, plain.classnames, 40, mean, std, "caltech")
    idx = [0, 7, 31, 7]
    first, again = cached.batch(idx)["images"], cached.batch(idx)["images"]
    assert torch.equal(first, plain.batch(idx)["images"]) and torch.equal(again, first)
    assert sorted(cached._decoded) == [0, 7, 31] and cached._decoded[0].dtype == torch.uint8
    uncached = decoded_once_dataset(plain.items, plain.classnames, 40, mean, std, "caltech", cache=False)
    assert torch.equal(uncached.batch(idx)["images"], first) and not uncached._decoded
