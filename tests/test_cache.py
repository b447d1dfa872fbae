"""Feature cache: miss then hit (same features), invalidated by weights, transform, file list or file content."""

import os

import pytest
import torch

from gram_plugin.backbones import tiny_openclip
from gram_plugin.cache import FeatureCache, cache_key, encode_dataset
from gram_plugin.data import default_dataset


def _small(bb, tmp_path):
    ds = default_dataset(bb.preprocess)
    keep = [i for i, it in enumerate(ds.items) if i % 24 < 3][:12]  # 3 images of 4 classes
    # copy the files so mtime changes in one test do not touch the package
    import shutil

    items = []
    for i in keep:
        dst = tmp_path / "imgs" / f"{i}.jpg"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(ds.items[i].path, dst)
        items.append(dst)
    sub = ds.subset(keep)
    from gram_plugin.data import ImageDataset, Item

    return ImageDataset([Item(str(p), it.label) for p, it in zip(items, sub.items)], ds.classnames, bb.preprocess)


def test_hit_miss_invalidate(bb, tmp_path):
    ds = _small(bb, tmp_path)
    cache = FeatureCache(tmp_path / "cache", batch_size=5, progress=False)
    f1 = cache.features(bb, ds)
    assert (cache.hits, cache.misses) == (0, 1)
    torch.testing.assert_close(f1, encode_dataset(bb, ds, progress=False))
    f2 = cache.features(bb, ds)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(f1, f2)
    # other weights
    cache.features(tiny_openclip(1), ds.with_transform(tiny_openclip(1).preprocess))
    assert cache.misses == 2
    # other transform
    from torchvision import transforms as T

    other = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor()])
    cache.features(bb, ds.with_transform(other))
    assert cache.misses == 3
    # other file list, and a file that changed on disk
    cache.features(bb, ds.subset(range(6)))
    assert cache.misses == 4
    st = os.stat(ds.items[0].path)
    os.utime(ds.items[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache.features(bb, ds)  # the key is the bytes: a touched file is the same image
    assert (cache.hits, cache.misses) == (2, 4)
    with open(ds.items[1].path, "rb") as src, open(ds.items[0].path, "wb") as dst:
        dst.write(src.read())  # another picture under the same name
    cache.features(bb, ds)
    assert cache.misses == 5
    cache.features(bb, ds)
    assert cache.hits == 3


def test_damaged_cache_file_is_recomputed(bb, tmp_path):
    ds = _small(bb, tmp_path)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    f1 = cache.features(bb, ds)
    cache.path_for(cache_key(bb, ds)[0]).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="is not a readable safetensors file.*: recomputing"):
        f2 = cache.features(bb, ds)
    assert cache.misses == 2 and torch.equal(f1, f2)
    assert cache.attach(bb, ds).batch([0, 1])["features"].shape == (2, 32)
