"""Topic words by class-based TF-IDF (GRAM eq. 1) and one distinct name per topic."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import CHCError

def ctfidf(docs_per_topic: Sequence[str], stop_words="english") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class-based TF-IDF: one document per topic -> (vocabulary, scores (L, V), counts N_wl (L, V)).

    ``tfidf(w, l) = N_wl / N_l * log(L / (L_w + 1))`` (GRAM eq. 1); counts by scikit-learn's
    ``CountVectorizer`` with English stop words removed.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(stop_words=stop_words)
    try:
        counts = vectorizer.fit_transform(docs_per_topic).toarray().astype(np.float64)
    except ValueError as e:  # empty vocabulary: only stop words / punctuation
        raise CHCError(f"no words left to name topics after stop-word removal ({e})") from None
    n_l = counts.sum(axis=1, keepdims=True)
    tf = np.divide(counts, n_l, out=np.zeros_like(counts), where=n_l > 0)
    n_topics = counts.shape[0]
    l_w = (counts > 0).sum(axis=0)
    idf = np.log(n_topics / (l_w + 1.0))
    return list(vectorizer.get_feature_names_out()), tf * idf, counts


def rank_words(vocab: Sequence[str], scores: np.ndarray, counts: np.ndarray, top: int) -> tuple[list[list], str]:
    """Per topic, its ``top`` words with scores, best first; (ranking, scoring used)."""
    n_topics = scores.shape[0]
    scoring = "ctfidf"
    if n_topics == 1:  # log(1/2) < 0 for every word: rank by term frequency instead (documented fallback)
        scoring = "tf"
        scores = counts / max(counts.sum(), 1.0)
    ranked = []
    for l in range(n_topics):
        present = np.nonzero(counts[l] > 0)[0]
        order = sorted(present, key=lambda j: (-scores[l, j], -counts[l, j], vocab[j]))
        ranked.append([[vocab[j], float(scores[l, j])] for j in order[:top]])
    return ranked, scoring


def unique_names(ranked: list[list], sizes: Sequence[int]) -> list[str]:
    """Each topic's best word not taken by a larger topic (topic id if all its words are taken)."""
    names = [""] * len(ranked)
    taken = set()
    for l in sorted(range(len(ranked)), key=lambda l: (-sizes[l], l)):
        name = next((w for w, _ in ranked[l] if w not in taken), None)
        names[l] = name if name is not None else f"topic{l}"
        taken.add(names[l])
    return names
