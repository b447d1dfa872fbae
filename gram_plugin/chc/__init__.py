"""Cross-Modal Hierarchical Clustering (GRAM §3.2-3.3) and domain-shift task generation.

Pipeline (``build_hierarchy``)::

    captions -> Sentence-BERT embeddings (cached) -> UMAP -> HDBSCAN topics
             -> one topic word per topic by class-based TF-IDF
             -> k-means on image features inside each topic -> visual domains

c-TF-IDF (GRAM eq. 1): ``tfidf(w, l) = N_wl / N_l * log(L / (L_w + 1))`` where N_wl counts word w in
topic l, N_l all (non-stop) words of topic l, L the number of topics and L_w the number of topics
containing w. Documented fallbacks:

* a single topic (L = 1): the idf factor is log(1/2) for every word, which would rank the rarest
  word first, so words are ranked by term frequency N_wl / N_l instead (``"scoring": "tf"``);
* ties (e.g. L = 2, where every word exclusive to a topic scores 0) are broken by N_wl, then
  alphabetically;
* class names must differ inside a task, so each topic's ``name`` is its best-ranked word not
  already taken by a larger topic (``words`` keeps the plain ranking).

Noise (HDBSCAN label -1) is explicit: ``noise="drop"`` (default) leaves those items out of every
topic, ``noise="nearest"`` assigns them to the topic with the nearest centroid in UMAP space; the
count and share are recorded either way. All noise is an error naming the knob to turn.

Several captions of one image (Flickr8k/COCO style ``<image>#k``) vote: an image joins the topic
most of its non-noise captions fall in (ties: the lower topic id). Items of a topic are image
indices; without image ids every caption is its own item. Without image features (text-only) each
topic has one domain holding all its items.

:class:`CHCTaskSource` turns a hierarchy into meta-learning tasks: K_t topics; support from ONE
visual domain per topic, query uniformly from the rest of the topic's items (all domains).

Layout (one stage per module; ``from gram_plugin.chc import ...`` gives every public name; the
``gram-plugin chc`` command is gram_plugin/cli/chc.py)::

    config.py      CHCConfig, CHCError, DEFAULT_MODEL
    reading.py     read_captions, load_image_features
    embedding.py   embed_captions (Sentence-BERT, cached per chunk), captions_hash
    reduction.py   reduce_umap, exact_cosine_knn
    clustering.py  cluster_hdbscan
    naming.py      ctfidf, rank_words, unique_names
    domains.py     kmeans_domains
    hierarchy.py   build_hierarchy, save_hierarchy, load_hierarchy, summary, FORMAT
    scaling.py     how HDBSCAN's sizes scale with the number of captions (CHCConfig's defaults)
    tasks.py       CHCTaskSource
    corpus.py      image-caption corpora: read_corpus, Corpus, CorpusError (Flickr / COCO / CC3M-style)
    images.py      corpus_features (frozen image tower, FeatureCache), corpus_task_source, ImageTower
    view.py        describe_hierarchy (text report), draw_hierarchy (thumbnails per topic and domain)
    pipeline.py    corpus_chc -> CorpusCHC (corpus, features, hierarchy, .task_source), write_hierarchy
"""

from __future__ import annotations

from ..lazy import lazy_exports

# module -> the names it gives the package (imported on first use: numpy / torch / sentence-transformers
# only when a stage is asked for, so the command line reads CHCConfig without them)
__getattr__, __dir__ = lazy_exports(__name__, {
    "clustering": ["cluster_hdbscan"],
    "config": ["DEFAULT_MODEL", "CHCConfig", "CHCError"],
    "corpus": ["Corpus", "CorpusError", "read_corpus"],
    "domains": ["kmeans_domains"],
    "embedding": ["ENCODE_CHUNK", "_resolve_model", "captions_hash", "embed_captions"],
    "hierarchy": ["FORMAT", "build_hierarchy", "load_hierarchy", "save_hierarchy", "summary"],
    "images": ["ImageTower", "corpus_features", "corpus_task_source"],
    "naming": ["ctfidf", "rank_words", "unique_names"],
    "pipeline": ["CorpusCHC", "corpus_chc", "write_hierarchy"],
    "reading": ["load_image_features", "read_captions"],
    "reduction": ["exact_cosine_knn", "reduce_umap"],
    "tasks": ["CHCTaskSource"],
    "view": ["describe_hierarchy", "draw_hierarchy"],
})

__all__ = [
    "CHCConfig", "CHCError", "CHCTaskSource", "DEFAULT_MODEL", "ENCODE_CHUNK", "FORMAT",
    "Corpus", "CorpusCHC", "CorpusError", "ImageTower", "corpus_chc", "corpus_features", "corpus_task_source", "describe_hierarchy",
    "draw_hierarchy", "read_corpus", "write_hierarchy",
    "build_hierarchy", "captions_hash", "cluster_hdbscan", "ctfidf",
    "embed_captions", "exact_cosine_knn", "kmeans_domains", "load_hierarchy", "load_image_features",
    "rank_words", "read_captions", "reduce_umap", "save_hierarchy", "summary", "unique_names",
]
