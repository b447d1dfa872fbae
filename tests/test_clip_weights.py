"""CLIP weights for the Dassl forks without internet: ``GRAM.CLIP_WEIGHTS`` (a local file or ``random``)
applied by ``compat.patch_dassl`` through the fork's own ``load_clip_to_cpu``, and one clear message
when the fork's download fails.

The first tests use a stand-in fork module (a vendored ``clip.clip`` with ``_MODELS`` / ``_download``
and a trainer module with ``load_clip_to_cpu(cfg)``, as every CoOp-style fork has) on the stand-in
Dassl of tests/test_adapters_coop.py; the integration tests run the real CoOp and MaPLe trainers
(tests/fixtures/upstream.py) with the download made to fail as it does offline.
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from test_adapters_coop import fake_dassl  # noqa: F401  (fixture: a Dassl stand-in for patch_dassl)

URL = "https://openaipublic.azureedge.net/clip/models/5806e77c/ViT-B-16.pt"

_FAKE_CLIP = f'''
import os, urllib.request
_MODELS = {{"ViT-B/16": "{URL}"}}

def _download(url, root=os.path.expanduser("~/.cache/clip")):
    with urllib.request.urlopen(url) as source:
        return source.read()
'''

_FAKE_TRAINER = '''
import torch
from clip import clip

def load_clip_to_cpu(cfg):
    path = clip._download(clip._MODELS[cfg.MODEL.BACKBONE.NAME])
    return torch.load(path, map_location="cpu", weights_only=True)
'''


def offline(*args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


@pytest.fixture
def fork(fake_dassl, tmp_path, monkeypatch):  # noqa: F811  (fake_dassl: the fixture)
    """A fork's vendored clip package and a trainer module, imported (as its train.py does) and patched."""
    root = tmp_path / "fork"
    (root / "clip").mkdir(parents=True)
    (root / "clip" / "__init__.py").write_text("")
    (root / "clip" / "clip.py").write_text(_FAKE_CLIP)
    (root / "fork_trainer.py").write_text(_FAKE_TRAINER)
    for name in ("clip", "clip.clip", "fork_trainer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    import fork_trainer

    from gram_plugin.adapters.compat import patch_dassl

    done = patch_dassl(cuda_on_cpu=False)
    assert done["clip_loaders"] >= 2  # the vendored _download and the trainer's load_clip_to_cpu (+ any other fork's)
    assert fork_trainer.load_clip_to_cpu.__wrapped__ and sys.modules["clip.clip"]._download.__wrapped__
    yield fork_trainer
    for name in ("clip", "clip.clip", "fork_trainer"):
        sys.modules.pop(name, None)


def cfg_with(weights=None):
    gram = SimpleNamespace(CLIP_WEIGHTS=weights) if weights is not None else None
    cfg = SimpleNamespace(MODEL=SimpleNamespace(BACKBONE=SimpleNamespace(NAME="ViT-B/16")), TRAINER=SimpleNamespace(NAME="X"))
    if gram is not None:
        cfg.GRAM = gram
    return cfg


def test_a_failed_download_says_what_was_downloaded_and_how_to_give_a_file(fork):
    from gram_plugin.adapters.compat import ClipWeightsError

    for cfg in (cfg_with(), cfg_with("")):  # no GRAM node, and GRAM.CLIP_WEIGHTS ""
        with pytest.raises(ClipWeightsError) as e:
            fork.load_clip_to_cpu(cfg)
        message = str(e.value)
        assert message.startswith(f"the CLIP weights for ViT-B/16 were being downloaded from {URL}")
        assert "Name or service not known" in message
        assert "GRAM.CLIP_WEIGHTS /path/to/ViT-B-16.pt" in message and "--clip-weights FILE" in message
        assert "GRAM.CLIP_WEIGHTS random" in message and "~/.cache/clip" in message


def test_a_local_file_is_read_by_the_forks_own_loader(fork, tmp_path, capsys):
    weights = {"w": torch.arange(3.0)}
    path = tmp_path / "my ViT-B-16.pt"
    torch.save(weights, path)
    loaded = fork.load_clip_to_cpu(cfg_with(str(path)))  # urlopen would fail: the file is used instead
    assert torch.equal(loaded["w"], weights["w"])
    assert f"CLIP weights: {path.resolve()} (GRAM.CLIP_WEIGHTS)" in capsys.readouterr().out


@pytest.mark.parametrize("bad,says", [("missing.pt", "no such file"), (".", "is a folder, not a file")])
def test_a_bad_clip_weights_option_names_the_option_and_the_file(fork, tmp_path, monkeypatch, bad, says):
    from gram_plugin.adapters.compat import ClipWeightsError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipWeightsError, match=rf"^GRAM.CLIP_WEIGHTS {bad}: {says}"):
        fork.load_clip_to_cpu(cfg_with(bad))


def test_the_option_applies_only_inside_the_trainers_loader(fork, tmp_path):
    """_download called outside load_clip_to_cpu (clip.load, another library) still downloads."""
    from gram_plugin.adapters.compat import ClipWeightsError

    path = tmp_path / "w.pt"
    torch.save({}, path)
    fork.load_clip_to_cpu(cfg_with(str(path)))
    with pytest.raises(ClipWeightsError, match="were being downloaded"):
        sys.modules["clip.clip"]._download(URL)


def test_patch_dassl_twice_wraps_once(fork):
    from gram_plugin.adapters.compat import patch_dassl

    assert patch_dassl(cuda_on_cpu=False)["clip_loaders"] == 0
    loader = fork.load_clip_to_cpu
    assert loader.__wrapped__.__module__ == "fork_trainer" and not hasattr(loader.__wrapped__, "__wrapped__")


# -- the real upstream trainers ------------------------------------------------------------------
from fixtures.upstream import import_dassl, make_cfg, upstream, weights_dir  # noqa: E402,F401  (fixture)


@pytest.fixture
def real(request, monkeypatch, weights_dir, tmp_path):  # noqa: F811
    import_dassl()
    monkeypatch.setenv("GRAM_CLIP_CACHE", str(tmp_path / "clip_cache"))
    with upstream(request.param, monkeypatch, weights_dir) as up:
        yield up


def clip_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.integration
@pytest.mark.parametrize("real", ["CoOp"], indirect=True)
def test_real_coop_offline_download_fails_with_the_message(real, caltech_root, tmp_path, monkeypatch):
    """The fork's own clip._download (the fixture's stand-in removed) with the network unreachable."""
    import importlib

    from dassl.engine import build_trainer

    from gram_plugin.adapters.compat import ClipWeightsError, patch_dassl

    import clip.clip

    importlib.reload(clip.clip)  # upstream's own _download again (the fixture restores its stand-in after)
    assert not hasattr(clip.clip._download, "__wrapped__")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    patch_dassl()
    cfg = make_cfg(real, caltech_root, tmp_path / "out", "vit_b16_ctxv1.yaml")
    with pytest.raises(ClipWeightsError, match=r"^the CLIP weights for ViT-B/16 were being downloaded from https://openaipublic"):
        build_trainer(cfg)


@pytest.mark.integration
@pytest.mark.parametrize("real", ["CoOp"], indirect=True)
def test_real_coop_reads_a_local_file_and_a_random_clip(real, caltech_root, tmp_path):
    from dassl.engine import build_trainer

    from gram_plugin.adapters.compat import random_clip_file

    import clip.model

    # a local file: the trainer's CLIP holds exactly its weights (fp16 after the fork's convert_weights)
    local = random_clip_file(clip.model, 32, folder=tmp_path / "mine")
    state = torch.load(local, weights_only=True)
    state["text_projection"] = state["text_projection"] + 1  # not the fixture's weights
    torch.save(state, local)
    trainer = build_trainer(make_cfg(real, caltech_root, tmp_path / "a", "vit_b16_ctxv1.yaml", ["GRAM.CLIP_WEIGHTS", str(local)]))
    assert torch.equal(trainer.model.text_encoder.text_projection.detach().cpu(), state["text_projection"])

    # random: built at the run's INPUT.SIZE (the fixture's stand-in download is 32 px, so this is the
    # option at work), the same CLIP in two builds (a train run and its later evaluation)
    opts = ["GRAM.CLIP_WEIGHTS", "random", "INPUT.SIZE", "(64, 64)"]
    first = build_trainer(make_cfg(real, caltech_root, tmp_path / "b", "vit_b16_ctxv1.yaml", opts))
    second = build_trainer(make_cfg(real, caltech_root, tmp_path / "c", "vit_b16_ctxv1.yaml", opts))
    assert first.model.image_encoder.input_resolution == 64
    a, b = clip_state(first.model.image_encoder), clip_state(second.model.image_encoder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # drawn without touching the caller's RNG (Dassl seeds it before build_trainer)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    random_clip_file(clip.model, 32, folder=tmp_path / "fresh")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.integration
@pytest.mark.parametrize("real", ["MaPLe"], indirect=True)
def test_random_clip_fits_maples_hard_coded_widths(real, caltech_root, tmp_path):
    """MaPLe's prompt learner hard-codes 512 / 768: GRAM.CLIP_WEIGHTS random gives it those widths."""
    from dassl.engine import build_trainer

    from fixtures.upstream import caltech_folder

    data = caltech_folder(caltech_root, tmp_path / "data", 4)
    trainer = build_trainer(make_cfg(real, data, tmp_path / "out", "vit_b16_c2_ep5_batch4_2ctx.yaml",
                                     ["GRAM.CLIP_WEIGHTS", "random", "TRAINER.MAPLE.PROMPT_DEPTH", "2"]))
    assert trainer.model.text_encoder.ln_final.weight.shape == (512,)
    assert trainer.model.image_encoder.conv1.weight.shape[0] == 768
