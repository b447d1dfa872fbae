"""What the walk-throughs need from ``gram-plugin meta-train --dassl-config`` besides the command itself
(tests/test_meta_command.py): ``--clip-weights``, seeding the trainer as ``train.py`` does, and a
refusal in the flags' words when the dataset's classes hold too few images for the tasks
(ImageNet-mini: 10 a class). The integration tests run the real CoOp / CoCoOp (tests/fixtures/upstream.py)
with the CLIP download failing as it does offline.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gram_plugin.cli import main
from test_meta_command import fake_fork  # noqa: F401  (fixture)

SMALL = ["--meta-steps", "2", "--meta-batch-size", "2", "--inner-steps", "1", "--n-way", "3", "--k-support", "1",
         "--k-query", "1", "--shots", "2", "--quiet", "--threads", "1"]
TINY_OPTS = ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]


def command(fork, root, out, *extra, trainer="CoOp", config="vit_b16_ctxv1.yaml", opts=TINY_OPTS):
    return ["meta-train", "--dassl-config", str(Path(fork) / "configs/trainers" / trainer / config),
            "--dataset-config", str(Path(fork) / "configs/datasets/caltech101.yaml"), "--trainer", trainer,
            "--fork", str(fork), "--root", str(root), "--out", str(out), *SMALL, *extra, *opts]


def test_a_missing_clip_weights_file_is_refused_before_the_fork_is_loaded(fake_fork, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("yacs")
    argv = command(fake_fork, tmp_path, tmp_path / "run", "--clip-weights", str(tmp_path / "ViT-B-16.pt"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--clip-weights {tmp_path / 'ViT-B-16.pt'} does not exist" in err
    assert not (fake_fork / "ran").exists() and not (tmp_path / "run").exists()


def test_pool_problem_names_the_flags_and_the_numbers_to_use():
    from gram_plugin.cli.dassl import pool_problem
    from gram_plugin.cli.options import TaskConfig

    train_x = [SimpleNamespace(label=c) for c in range(50) for _ in range(10)]  # ImageNet-mini: 10 a class
    cfg = SimpleNamespace(DATASET=SimpleNamespace(NAME="ImageNet", NUM_SHOTS=16, ROOT="/data"))
    message = pool_problem(TaskConfig(n_way=5, k_support=5, k_query=7), train_x, cfg)
    assert message == ("--k-support 5 + --k-query 7 = 12 images per class, but only 0 of the 50 base classes of ImageNet "
                       "have that many (DATASET.NUM_SHOTS 16 found at most 10 images a class) and the tasks need 5: "
                       "draw smaller tasks, e.g. --shots 10 --k-support 5 --k-query 5")
    assert pool_problem(TaskConfig(n_way=5, k_support=5, k_query=5), train_x, cfg) is None
    assert "--k-support 10 + 1 query image" in pool_problem(TaskConfig(tasks="per-dataset", k_support=10), train_x, cfg)


# -- through the real CoOp ---------------------------------------------------------------------------------
from fixtures.upstream import caltech_folder, coop, upstream, weights_dir  # noqa: E402,F401  (fixtures)


def offline(*args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


@pytest.fixture
def upstream_download(coop, monkeypatch):  # noqa: F811
    """CoOp's own clip._download again (not the fixture's stand-in), with the network unreachable."""
    import importlib

    import clip.clip

    importlib.reload(clip.clip)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return coop


@pytest.mark.integration
def test_offline_without_clip_weights_the_command_says_what_to_do(upstream_download, caltech_root, tmp_path, capsys):
    data = caltech_folder(caltech_root, tmp_path / "data", 8)
    assert main(command(upstream_download.root, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gram-plugin: error: the CLIP weights for ViT-B/16 were being downloaded from "
                                               "https://openaipublic.azureedge.net/clip/models/"), err
    assert "--clip-weights FILE" in err[0]


@pytest.mark.integration
def test_clip_weights_flag_loads_the_file_through_the_forks_loader(upstream_download, caltech_root, tmp_path, capsys):
    from gram_plugin import PromptInit
    from gram_plugin.adapters.compat import random_clip_file

    import clip.model

    data = caltech_folder(caltech_root, tmp_path / "data", 8)
    weights = random_clip_file(clip.model, 32, folder=tmp_path / "weights")
    # the flag beats a KEY VALUE naming another (missing) file
    argv = command(upstream_download.root, data, tmp_path / "run", "--clip-weights", str(weights),
                   opts=[*TINY_OPTS, "GRAM.CLIP_WEIGHTS", "/nowhere.pt"])
    assert main(argv) == 0, capsys.readouterr().err
    # once, though the command loads the CLIP twice (the trainer's model, then its prompt-free copy)
    assert capsys.readouterr().out.count(f"CLIP weights: {weights.resolve()} (GRAM.CLIP_WEIGHTS)") == 1
    init = PromptInit.load(tmp_path / "run" / "init.safetensors")
    assert init.metadata["clip_weights"] == str(weights)


@pytest.mark.integration
def test_the_same_seed_gives_the_same_init_through_cocoop(coop, caltech_root, tmp_path):  # noqa: F811
    """CoCoOp's Meta-Net starts from torch's global RNG: the command seeds it (and the split CoOp writes)
    from --seed as train.py does, so a rerun reproduces the init and another seed does not."""
    from gram_plugin import PromptInit

    data = caltech_folder(caltech_root, tmp_path / "data", 8)
    inits = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        torch.manual_seed(100 + len(inits))  # whatever the process did before
        argv = command(coop.root, data, tmp_path / name, "--seed", seed, "--method", "maml", trainer="CoCoOp",
                       config="vit_b16_c4_ep10_batch1_ctxv1.yaml")
        assert main(argv) == 0
        inits[name] = PromptInit.load(tmp_path / name / "init.safetensors").tensors
    key = "prompt_learner.meta_net.linear1.weight"
    assert torch.equal(inits["a"][key], inits["b"][key])
    assert not torch.equal(inits["a"][key], inits["c"][key])


@pytest.mark.integration
def test_clip_weights_random_says_so_once(upstream_download, caltech_root, tmp_path, capsys):
    """A smoke run on a random CLIP prints its notice once, however often the command builds the trainer's model."""
    from gram_plugin import PromptInit

    data = caltech_folder(caltech_root, tmp_path / "data", 8)
    assert main(command(upstream_download.root, data, tmp_path / "run", "--clip-weights", "random")) == 0
    out = capsys.readouterr().out
    assert out.count("CLIP weights: a random CLIP (GRAM.CLIP_WEIGHTS random; 32 px") == 1, out
    assert PromptInit.load(tmp_path / "run" / "init.safetensors").metadata["clip_weights"] == "random"
