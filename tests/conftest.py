"""Shared test fixtures: tiny random-init open_clip CLIPs and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA_CACHE = Path(os.environ.get("GRAM_TEST_DATA_CACHE", Path.home() / ".cache" / "gram-plugin-tests"))


def make_tiny_clip(seed: int = 0, image_size: int = 32, embed_dim: int = 32, text_width: int = 32, vision_width: int = 64):
    """A randomly initialised open_clip CLIP with the real module layout and tokenizer (77 tokens)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(layers=2, width=vision_width, head_width=32, patch_size=8, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=2),
    )
    return model.eval()


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture(scope="module")
def bb():
    """gram-plugin's tiny open_clip backbone (random weights, real layout), one per test module."""
    from gram_plugin.backbones import tiny_openclip

    return tiny_openclip(0)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs on one torch thread (the machine is shared; timings and results do not depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def extract_shared(archive: str) -> Path:
    """Extract ``../shared/data/<archive>`` once into the test cache; return the cache folder."""
    from gram_plugin.data import extract_archive

    src = SHARED_DATA / archive
    if not src.exists():
        pytest.skip(f"real data {src} not available")
    return extract_archive(archive, SHARED_DATA, DATA_CACHE)


@pytest.fixture(scope="session")
def caltech_root() -> Path:
    return extract_shared("caltech-101.tar")


@pytest.fixture(scope="session")
def imagenet_root() -> Path:
    return extract_shared("imagenet-mini.tar")


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    return extract_shared("hymenoptera.tar")


@pytest.fixture(scope="session")
def flickr8k_1k_root() -> Path:
    """The real image-caption corpus: 1,000 Flickr8k photos with 5 captions each (captions.txt + images/)."""
    return extract_shared("flickr8k-1k.tar") / "flickr8k-1k"
