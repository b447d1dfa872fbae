"""CHC above ``fit_sample`` captions (issue 26): UMAP + HDBSCAN fit on a sample, the rest assigned.

Synthetic topics (blobs on the sphere) so the right answer is known; the agreement with the exact path
on the real Flickr8k captions is a benchmark (benchmarks/chc_cc3m.py, CHC.md), not a test.
"""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from gram_plugin.chc import CHCConfig, build_hierarchy, sampling

WORDS = ["dog", "beach", "bike", "snow", "guitar"]


def blobs(n_topics=4, per=300, dim=16, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(n_topics, dim)) * 6
    x = np.concatenate([c + g.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(n_topics), per)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


CFG = dict(umap_neighbors=10, min_cluster_size=60, min_samples=10, progress=False, n_domains=1)


def test_nearest_in_sample_is_the_brute_force_cosine_neighbours():
    g = np.random.default_rng(0)
    q, s = g.normal(size=(37, 8)).astype(np.float32), g.normal(size=(50, 8)).astype(np.float32)
    idx, dist = sampling.nearest_in_sample(q, s, k=5, chunk=7)  # several chunks
    qn, sn = q / np.linalg.norm(q, axis=1, keepdims=True), s / np.linalg.norm(s, axis=1, keepdims=True)
    d = 1 - qn @ sn.T
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :5], atol=1e-5)


def test_transform_weights_are_umaps_memberships_and_average_the_neighbours():
    dists = np.array([[0.1, 0.2, 0.4], [0.0, 0.0, 0.3]], dtype=np.float32)
    w = sampling.membership_weights(dists, 3)
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)
    assert (np.diff(w, axis=1) <= 1e-7).all()  # nearer neighbours weigh more
    assert w[1, 0] == pytest.approx(w[1, 1])  # equal distances, equal weights
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    got = sampling.transform_coords(np.array([[0, 1, 2], [2, 1, 0]]), w, coords)
    np.testing.assert_allclose(got[0], w[0, 1] * coords[1] + w[0, 2] * coords[2], atol=1e-6)
    labels = sampling.vote(np.array([[0, 1, 2]]), np.array([[0.2, 0.5, 0.3]]), np.array([-1, 4, 2]))
    assert labels.tolist() == [4]


@pytest.mark.parametrize("assign,search", [("umap", "exact"), ("knn", "exact"), ("umap", "nndescent")])
def test_sampled_path_finds_the_topics_of_the_exact_path(assign, search):
    x, truth = blobs()
    captions = [f"a {WORDS[t]} picture number {i}" for i, t in enumerate(truth)]
    exact = build_hierarchy(captions, embeddings=x, config=CHCConfig(**CFG, fit_sample=0))
    cfg = CHCConfig(**CFG, fit_sample=400, assign=assign, assign_chunk=250, device="cpu", assign_knn=search)
    sampled = build_hierarchy(captions, embeddings=x, config=cfg)
    assert exact["fit"]["path"] == "exact" and sampled["fit"]["path"] == "sampled" and sampled["fit"]["assign_knn"] == search
    assert sampled["fit"]["sample_min_cluster_size"] == 20 and sampled["fit"]["sample_min_samples"] == 3  # scaled by 1/3
    assert {"umap_s", "hdbscan_s", "assign_s"} <= set(sampled["timings_s"])

    def labels(h):
        out = np.full(len(captions), -1)
        for t in h["topics"]:
            out[t["captions"]] = t["id"]
        return out

    assert exact["n_topics"] == sampled["n_topics"] == 4
    assert adjusted_rand_score(truth, labels(exact)) > 0.95
    assert adjusted_rand_score(labels(exact), labels(sampled)) > 0.95
    assert sorted(t["name"] for t in sampled["topics"]) == sorted(WORDS[:4])


def test_assignment_does_not_depend_on_the_chunk_size():
    x, _ = blobs(per=150)
    runs = [sampling.reduce_and_cluster(x, CHCConfig(**{**CFG, "min_cluster_size": 30}, fit_sample=200, assign_chunk=c,
                                                     device="cpu", assign_knn="exact"))
            for c in (1000, 97)]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


def test_bad_sampling_settings_are_named():
    with pytest.raises(ValueError, match="assign must be"):
        CHCConfig(assign="nearest")
    with pytest.raises(ValueError, match="fit_sample must be 0"):
        CHCConfig(fit_sample=5)
    with pytest.raises(ValueError, match="assign_knn must be"):
        CHCConfig(assign_knn="faiss")


def test_the_index_finds_the_brute_force_neighbours_on_clear_data():
    x, _ = blobs(per=200)
    sample, queries = x[::2], x[1::2]
    exact_idx, exact_dist = sampling.nearest_in_sample(queries, sample, 10)
    idx, dist = sampling.SampleIndex(sample, seed=0).query(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact_idx)])
    assert recall > 0.9
    same_first = idx[:, 0] == exact_idx[:, 0]  # approximate: a few may miss their nearest
    assert same_first.mean() > 0.98
    np.testing.assert_allclose(dist[same_first, 0], exact_dist[same_first, 0], atol=1e-5)


def test_unset_sizes_are_resolved_for_the_whole_corpus_then_scaled_to_the_sample():
    from gram_plugin.chc.scaling import scaled_min_cluster_size, scaled_min_samples

    x, _ = blobs(per=300)  # 1,200 captions: min_cluster_size 5 / min_samples 3 by the scaled rule
    mcs = scaled_min_cluster_size(len(x))
    _, _, info = sampling.reduce_and_cluster(x, CHCConfig(umap_neighbors=10, progress=False, fit_sample=400,
                                                          device="cpu", assign_knn="exact"))
    # the corpus's share kept on the sample (not the rule applied to the sample's 400: 5 and 3)
    assert (info["sample_min_cluster_size"], info["sample_min_samples"]) == (
        sampling.scaled(mcs, 1 / 3), sampling.scaled(scaled_min_samples(mcs), 1 / 3)) == (2, 2)


def test_the_default_assignment_is_the_neighbours_vote():
    # issue 26: on the real Flickr8k captions the vote agreed better with the exact path than HDBSCAN's
    # approximate_predict on UMAP-transformed coordinates and kept its noise share (benchmarks/README.md)
    x, _ = blobs(per=150)
    x = np.concatenate([x, np.random.default_rng(1).normal(size=(150, x.shape[1])).astype(np.float32)])  # + scattered captions
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = CHCConfig(**{**CFG, "min_cluster_size": 30}, fit_sample=250, device="cpu", assign_knn="exact")
    _, labels, info = sampling.reduce_and_cluster(x, cfg)
    assert info["assign"] == "knn"
    picked = sampling.sample_indices(len(x), 250, cfg.seed)
    rest = np.setdiff1d(np.arange(len(x)), picked)
    idx, dist = sampling.nearest_in_sample(x[rest], x[picked], cfg.umap_neighbors)
    expected = sampling.vote(idx, sampling.membership_weights(dist, cfg.umap_neighbors), labels[picked])
    np.testing.assert_array_equal(labels[rest], expected)


def test_the_vote_needs_no_queries_x_topics_table():
    # at 3.1M captions the sample has ~30,000 topics: a (chunk x topics) table is 15 GB per chunk
    import tracemalloc

    g = np.random.default_rng(0)
    sample_labels = g.integers(-1, 50_000, size=2_000)
    sample_labels[:3] = [7, 7, 3]
    idx = np.concatenate([[[0, 1, 2]], g.integers(0, 2_000, size=(199, 3))])
    weights = np.full((200, 3), 1 / 3, dtype=np.float32)
    weights[0] = [0.2, 0.2, 0.6]  # label 7 (0.4) loses to label 3 (0.6)
    tracemalloc.start()
    labels = sampling.vote(idx, weights, sample_labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels[0] == 3
    assert labels[1:].tolist() == sample_labels[idx[1:]].min(1).tolist()  # three labels, equal weights: the smallest
    assert peak < 1_000_000  # (200 x 50,001) float64 would be 80 MB


def test_the_vote_gives_the_labels_of_a_table_of_summed_weights():
    g = np.random.default_rng(0)
    for trial in range(20):
        sample_labels = g.integers(-1, int(g.integers(1, 40)), size=300)
        idx = g.integers(0, 300, size=(500, 15))
        dists = np.sort(g.random((500, 15)).astype(np.float32), 1)
        weights = sampling.membership_weights(np.round(dists, 1) if trial % 2 else dists, 15)  # rounded: ties
        table = np.zeros((500, sample_labels.max() + 2))  # labels -1 .. max
        np.add.at(table, (np.arange(500)[:, None], sample_labels[idx] + 1), weights)
        np.testing.assert_array_equal(sampling.vote(idx, weights, sample_labels), table.argmax(1) - 1)
