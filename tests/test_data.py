"""Datasets, CoOp layouts, CoOp's base/new rule, few-shot sampling and task sources on real images."""

import math

import pytest
import torch

from gram_plugin import TaskSource
from gram_plugin.data import (DataError, NWayKShotTasks, PerDatasetTasks, caltech101, default_dataset, few_shot,
                              image_folder, imagenet, subsample_classes)


def coop_subsample_classes(labels, subsample):
    """CoOp's DatasetBase.subsample_classes, re-typed from its definition (labels only)."""
    labels = sorted(set(labels))
    n = len(labels)
    m = math.ceil(n / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return relabeler


@pytest.fixture(scope="module")
def small():
    return default_dataset(lambda im: torch.zeros(3, 8, 8))


def test_default_dataset_is_real_and_small(small):
    assert len(small.classnames) == 10 and len(small) == 240
    assert "airplane" in small.classnames and "face" in small.classnames


def test_caltech101_layout_drops_like_coop(caltech_root):
    ds = caltech101(caltech_root)
    assert len(ds.classnames) == 100
    assert not any(n in ("BACKGROUND Google", "Faces easy", "Faces_easy") for n in ds.classnames)
    assert "face" in ds.classnames and "leopard" in ds.classnames


def test_imagenet_layout(imagenet_root):
    ds = imagenet(imagenet_root, "train")
    assert len(ds.classnames) == 100 and len(ds) == 1000
    with pytest.raises(DataError, match="classnames.txt"):
        imagenet(imagenet_root / "nowhere")


@pytest.mark.parametrize("n_classes", [5, 10])
def test_base_new_split_equals_coop_rule(small, n_classes):
    keep = [i for i, it in enumerate(small.items) if it.label < n_classes]
    ds = small.subset(keep, small.classnames[:n_classes])
    for part in ("base", "new"):
        sub = subsample_classes(ds, part)
        relabel = coop_subsample_classes([it.label for it in ds.items], part)
        expected = [(it.path, relabel[it.label]) for it in ds.items if it.label in relabel]
        assert [(it.path, it.label) for it in sub.items] == expected
        assert sub.classnames == [ds.classnames[y] for y in relabel]
    assert len(subsample_classes(ds, "base").classnames) == math.ceil(n_classes / 2)


def test_few_shot_seeded(small):
    a, b, c = few_shot(small, 4, seed=1), few_shot(small, 4, seed=1), few_shot(small, 4, seed=2)
    assert a.paths == b.paths != c.paths
    assert torch.bincount(a.labels).tolist() == [4] * 10
    with pytest.raises(DataError, match="fewer than 30 shots"):
        few_shot(small, 30)


def test_n_way_tasks(small):
    src = NWayKShotTasks(small, n_way=3, k_support=2, k_query=3)
    assert isinstance(src, TaskSource)
    t1 = src.sample(torch.Generator().manual_seed(0))
    t2 = src.sample(torch.Generator().manual_seed(0))
    assert t1.info == t2.info and len(t1.support["classnames"]) == 3
    assert t1.support["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert t1.query["images"].shape == (9, 3, 8, 8)
    s_paths = set(t1.info["classes"])
    assert len(s_paths) == 3
    with pytest.raises(DataError, match="at least 2 classes"):
        NWayKShotTasks(small, 1, 1, 1)
    with pytest.raises(DataError, match="empty support/query"):
        NWayKShotTasks(small, 3, 0, 1)
    with pytest.raises(DataError, match=">= 40 images"):
        NWayKShotTasks(small, 3, 20, 20)


def test_per_dataset_tasks_maml_clip_protocol(small):
    src = PerDatasetTasks(small, shots=16, k_support=5)
    t = src.sample(torch.Generator().manual_seed(0))
    assert torch.bincount(t.support["labels"]).tolist() == [5] * 10
    assert torch.bincount(t.query["labels"]).tolist() == [11] * 10
    assert t.support["classnames"] == small.classnames
    with pytest.raises(DataError, match="fewer than 30 shots"):
        PerDatasetTasks(small, shots=30, k_support=5)
    one = small.subset([i for i, it in enumerate(small.items) if it.label == 0])
    with pytest.raises(DataError, match="at least 2 classes"):
        PerDatasetTasks(one, shots=4, k_support=2)
    with pytest.raises(DataError, match="non-empty support and query"):
        PerDatasetTasks(small, shots=5, k_support=5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        image_folder(tmp_path)


def test_shared_data_dir_needs_an_argument_or_the_env_var(monkeypatch, tmp_path):
    from gram_plugin.data import shared_data_dir

    monkeypatch.delenv("GRAM_SHARED_DATA", raising=False)
    with pytest.raises(DataError, match="GRAM_SHARED_DATA"):
        shared_data_dir()
    assert shared_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("GRAM_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    with pytest.raises(DataError, match="does not exist"):
        shared_data_dir(tmp_path / "nowhere")


def test_extract_archive_once_and_fashion_mnist_files_equal_the_arrays(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import SHARED_DATA
    from gram_plugin.data import extract_archive, fashion_mnist

    if not (SHARED_DATA / "fashion-mnist-subset.npz").exists():
        pytest.skip("shared data not available")
    folder = extract_archive("hymenoptera.tar", SHARED_DATA, tmp_path)
    assert (folder / ".extracted").exists() and (folder / "hymenoptera" / "train" / "ants").is_dir()
    marker_time = (folder / ".extracted").stat().st_mtime_ns
    assert extract_archive("hymenoptera.tar", SHARED_DATA, tmp_path) == folder
    assert (folder / ".extracted").stat().st_mtime_ns == marker_time  # not extracted twice
    with pytest.raises(DataError, match="no missing.tar"):
        extract_archive("missing.tar", SHARED_DATA, tmp_path)
    ds = fashion_mnist("test", SHARED_DATA, tmp_path)
    arrays = np.load(SHARED_DATA / "fashion-mnist-subset.npz")
    assert len(ds) == len(arrays["y_test"]) and ds.classnames[0] == "t-shirt or top"
    assert torch.equal(ds.labels, torch.from_numpy(arrays["y_test"].astype(np.int64)))
    for i in (0, 517, len(ds) - 1):
        with Image.open(ds.items[i].path) as im:
            assert np.array_equal(np.asarray(im), arrays["x_test"][i])
