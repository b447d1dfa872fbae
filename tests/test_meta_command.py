"""``gram-plugin meta-train --dassl-config``: meta-train an init through the user's own Dassl trainer.

The first tests need no Dassl (the errors a user meets before anything runs). The integration
tests run the command on the real KaiyangZhou/CoOp fork (``GRAM_COOP_ROOT``, ``dassl`` importable),
with CoOp's ``load_clip_to_cpu`` replaced by a tiny random CLIP built with CoOp's own
``clip.model.CLIP`` (no pretrained weights offline), on the shared Caltech101.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from gram_plugin.cli import main

COOP_ROOT = os.environ.get("GRAM_COOP_ROOT")
SMALL = ["--steps", "4", "--meta-batch", "2", "--inner-steps", "1", "--n-way", "3", "--k-support", "1", "--k-query", "2",
         "--shots", "4", "--no-progress", "--threads", "1"]
TINY_OPTS = ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]


def command(fork, root, out, *extra, trainer="CoOp", config="vit_b16_ctxv1.yaml"):
    return ["meta-train", "--dassl-config", str(Path(fork) / "configs/trainers" / trainer / config),
            "--dataset-config", str(Path(fork) / "configs/datasets/caltech101.yaml"), "--trainer", trainer,
            "--fork", str(fork), "--root", str(root), "--out", str(out), *SMALL, *extra, *TINY_OPTS]


def test_missing_dassl_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dassl", None)  # as if Dassl were not installed
    assert main(command(tmp_path, tmp_path, tmp_path / "init.safetensors")) == 2
    err = capsys.readouterr().err
    assert "needs Dassl.pytorch (dassl is not installed)" in err and 'gram-plugin[dassl]' in err
    assert err.count("\n") == 1  # one line, no traceback


def test_existing_out_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "init.safetensors"
    out.write_bytes(b"keep me")
    assert main(command(tmp_path, tmp_path, out)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_fork_without_train_py(tmp_path, capsys):
    pytest.importorskip("dassl", reason="Dassl.pytorch is not installed")
    assert main(command(tmp_path, tmp_path, tmp_path / "init.safetensors")) == 2
    assert "no train.py there" in capsys.readouterr().err


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

    out = tmp_path / "inits" / "coop.safetensors"
    assert main(command(coop_fork, data_root, out, "--checkpoint-every", "2")) == 0
    printed = capsys.readouterr().out
    assert f'wrap(trainer, init="{out}", regulator=True)' in printed
    init = PromptInit.load(out)
    assert list(init.tensors) == ["prompt_learner.ctx"] and init.tensors["prompt_learner.ctx"].shape == (4, 32)
    assert init.metadata["method_name"] == "GRAM-CoOp" and init.metadata["meta_steps"] == 4
    assert init.metadata["source_tasks"] == {"kind": "n-way-k-shot", "dataset": "Caltech101", "n_way": 3, "k_support": 1, "k_query": 2}
    assert GradientRegulator.from_init(init) is not None
    assert (out.with_suffix(".run") / "checkpoint.safetensors").exists()

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

    whole = tmp_path / "whole.safetensors"
    assert main(command(coop_fork, data_root, whole, "--no-regulator")) == 0
    part = tmp_path / "part.safetensors"
    first = command(coop_fork, data_root, part, "--no-regulator", "--checkpoint-every", "1")
    first[first.index("--steps") + 1] = "2"
    assert main(first) == 0
    assert PromptInit.load(part).metadata["meta_steps"] == 2
    assert main(command(coop_fork, data_root, part, "--no-regulator", "--resume", "--overwrite")) == 0
    resumed, uninterrupted = PromptInit.load(part), PromptInit.load(whole)
    assert resumed.metadata["meta_steps"] == 4 and resumed.metadata["method_name"] == "MP-CoOp+clip"
    assert torch.equal(resumed.tensors["prompt_learner.ctx"], uninterrupted.tensors["prompt_learner.ctx"])


@pytest.mark.integration
def test_per_dataset_tasks_maml_clip(coop_fork, data_root, tmp_path):
    from gram_plugin import GradientRegulator, PromptInit

    out = tmp_path / "maml_clip.safetensors"
    argv = command(coop_fork, data_root, out, "--tasks", "per-dataset", "--no-regulator")
    argv[argv.index("--steps") + 1] = "1"
    argv[argv.index("--meta-batch") + 1] = "1"
    assert main(argv) == 0
    init = PromptInit.load(out)
    assert init.metadata["method_name"] == "MP-CoOp+clip" and GradientRegulator.from_init(init) is None
    assert init.metadata["source_tasks"] == {"kind": "per-dataset", "datasets": ["Caltech101"], "shots": 4, "k_support": 1}


def test_images_decoded_once_equal_the_per_access_transform():
    from torchvision import transforms as T

    from gram_plugin.adapters.meta_command import decoded_once_dataset
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
