"""GRAM's domain-shift tasks from a CHC hierarchy (:class:`CHCTaskSource`)."""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..tasks import Task
from .config import CHCError
from .hierarchy import load_hierarchy

SUPPORT_MODES = ("one-domain", "any-domain")  # GRAM's domain shift, or none (ablation)

class CHCTaskSource:
    """GRAM domain-shift tasks from a CHC hierarchy.

    Each task: ``n_way`` (K_t) topics drawn without replacement; for each, ``shots`` support items
    from ONE of its visual domains (drawn among domains with enough items) and ``queries`` query
    items drawn uniformly from the topic's remaining items (all domains). Class names are the
    topic names. Topics that cannot give ``shots`` from one domain plus ``queries`` more are skipped.

    Give exactly one of ``features`` (Tensor (n_items, dim), row = item index) or ``load_image``
    (item index -> image Tensor (3, H, W)); batches are the standard CLIP batch.

    ``support="any-domain"`` draws the support uniformly from the whole topic instead (the ablation
    without the simulated domain shift; ``info["support_domains"]`` is then ``None`` per class).
    ``info`` (JSON-able) is added to :meth:`describe`, which an exported init records.
    """

    def __init__(
        self,
        hierarchy: dict | str | os.PathLike,
        features: torch.Tensor | None = None,
        load_image: Callable[[int], torch.Tensor] | None = None,
        n_way: int = 5,
        shots: int = 1,
        queries: int = 4,
        support: str = "one-domain",
        info: dict | None = None,
    ):
        h = hierarchy if isinstance(hierarchy, dict) else load_hierarchy(hierarchy)
        if (features is None) == (load_image is None):
            raise ValueError("CHCTaskSource needs exactly one of features= or load_image=")
        for name, v in (("n_way", n_way), ("shots", shots), ("queries", queries)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if support not in SUPPORT_MODES:
            raise ValueError(f"support must be one of {list(SUPPORT_MODES)}, got {support!r}")
        self.support = support
        self.info = dict(info or {})  # added to describe(): e.g. the corpus the hierarchy came from
        if features is not None:
            features = torch.as_tensor(features)
            if features.ndim != 2 or features.shape[0] != h["n_items"]:
                raise ValueError(
                    f"features of shape {tuple(features.shape)} do not match the hierarchy's "
                    f"{h['n_items']} items: need (n_items, dim)"
                )
        self.features, self.load_image = features, load_image
        self.n_way, self.shots, self.queries = n_way, shots, queries
        self.topics = []
        self.skipped = []
        for t in h["topics"]:
            ok_domains = [d for d in range(len(t["domains"])) if len(t["domains"][d]) >= shots or support == "any-domain"]
            ok = [d for d in ok_domains if len(t["items"]) - shots >= queries]
            (self.topics if ok else self.skipped).append(t["id"])
        self._by_id = {t["id"]: t for t in h["topics"]}
        if len(self.topics) < n_way:
            raise CHCError(
                f"only {len(self.topics)} of {len(h['topics'])} topics can give {shots} shots from "
                f"{'one domain' if support == 'one-domain' else 'the topic'} "
                f"plus {queries} queries, fewer than n_way={n_way}; lower n_way / shots / queries"
            )

    def _batch(self, items: list[int], labels: list[int], classnames: list[str]) -> dict:
        if self.features is not None:
            x = {"features": self.features[torch.tensor(items, dtype=torch.long)]}
        else:
            x = {"images": torch.stack([self.load_image(i) for i in items])}
        x["labels"] = torch.tensor(labels, dtype=torch.long)
        x["classnames"] = list(classnames)
        return x

    def sample(self, generator: torch.Generator) -> Task:
        def randperm(n):
            return torch.randperm(n, generator=generator).tolist()

        chosen = [self.topics[i] for i in randperm(len(self.topics))[: self.n_way]]
        classnames, s_items, s_labels, q_items, q_labels = [], [], [], [], []
        support_domains, query_domains = [], []
        for label, tid in enumerate(chosen):
            t = self._by_id[tid]
            classnames.append(t["name"])
            if self.support == "one-domain":
                ok = [d for d in range(len(t["domains"])) if len(t["domains"][d]) >= self.shots]
                d = ok[int(torch.randint(len(ok), (1,), generator=generator))]
                dom_items = t["domains"][d]
            else:
                d, dom_items = None, t["items"]
            support = [dom_items[j] for j in randperm(len(dom_items))[: self.shots]]
            taken = set(support)
            rest = [i for i in t["items"] if i not in taken]
            query = [rest[j] for j in randperm(len(rest))[: self.queries]]
            domain_of = {i: k for k, dd in enumerate(t["domains"]) for i in dd}
            s_items += support
            s_labels += [label] * len(support)
            q_items += query
            q_labels += [label] * len(query)
            support_domains.append(d)
            query_domains.append([domain_of[i] for i in query])
        info = {
            "source": "chc",
            "topics": chosen,
            "classnames": classnames,
            "support_domains": support_domains,
            "query_domains": query_domains,
            "support_items": s_items,
            "query_items": q_items,
        }
        return Task(self._batch(s_items, s_labels, classnames), self._batch(q_items, q_labels, classnames), info)

    def describe(self) -> dict:
        return {
            "kind": "chc",
            "n_way": self.n_way,
            "shots": self.shots,
            "queries": self.queries,
            "support": self.support,
            **self.info,
            "usable_topics": len(self.topics),
            "skipped_topics": len(self.skipped),
        }
