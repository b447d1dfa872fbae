"""Seeing what CHC made of a corpus: a text report (topics, sizes, domains, example captions) and a
picture (a grid of thumbnails: one row per topic, columns grouped by visual domain)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

from ..safeio import atomic_write_bytes
from .hierarchy import summary


def _largest(h: dict, top: int | None) -> list[dict]:
    topics = sorted(h["topics"], key=lambda t: (-len(t["items"]), -t["n_captions"], t["id"]))
    return topics if top is None else topics[:top]


def describe_hierarchy(h: dict, captions: Sequence[str], examples: int = 3, top: int | None = None) -> str:
    """The hierarchy in words: the :func:`summary` line, then per topic (largest first; ``top`` of them,
    all by default) its name, caption / image counts, domain sizes, top words and ``examples`` of
    its captions.

    Args:
        h: a hierarchy from :func:`build_hierarchy`.
        captions: the captions it was built from (index = caption index).
    """
    if len(captions) != h["n_captions"]:
        raise ValueError(f"{len(captions)} captions for a hierarchy of {h['n_captions']}")
    lines = [summary(h, top=0)]
    if h["items_are"] == "images":
        lines.append(f"images without a topic (all their captions noise): {h['noise']['items_without_topic']}")
    for t in _largest(h, top):
        domains = ", ".join(str(len(d)) for d in t["domains"])
        lines.append(f"\n[{t['id']}] {t['name']}: {t['n_captions']} captions, {len(t['items'])} {h['items_are']}, "
                     f"{len(t['domains'])} domains ({domains}); words: {', '.join(w for w, _ in t['words'][:6])}")
        lines += [f"    - {captions[c]}" for c in t["captions"][:examples]]
    return "\n".join(lines) + "\n"


def draw_hierarchy(h: dict, image_paths: Sequence[str], path: str | os.PathLike, top: int = 12,
                   per_domain: int = 3, thumb_inches: float = 0.9) -> Path:
    """A PNG grid: the ``top`` largest topics as rows, ``per_domain`` thumbnails of each visual domain
    side by side (domains separated by a gap), titled with the topic name and sizes. Needs matplotlib
    and pillow (the ``clip`` extra).

    Args:
        h: a hierarchy whose items are images.
        image_paths: the image file of each item (``Corpus.image_paths``).
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if h["items_are"] != "images" or len(image_paths) != h["n_items"]:
        raise ValueError(f"draw_hierarchy needs one image path per item: {len(image_paths)} paths, "
                         f"{h['n_items']} {h['items_are']}")
    topics = _largest(h, top)
    n_dom = max((len(t["domains"]) for t in topics), default=1)
    cols = n_dom * per_domain + (n_dom - 1)  # one empty column between domains
    rows = max(len(topics), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * thumb_inches, rows * (thumb_inches + 0.25)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, t in enumerate(topics):
        for d, items in enumerate(t["domains"]):
            for k, item in enumerate(items[:per_domain]):
                ax = axes[r, d * (per_domain + 1) + k]
                with Image.open(image_paths[item]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((96, 96))
                    ax.imshow(im)
                if k == 0:
                    ax.set_title(f"domain {d} ({len(items)})", fontsize=6, loc="left")
        axes[r, 0].text(-0.1, 0.5, f"{t['name']}\n{len(t['items'])} img", transform=axes[r, 0].transAxes,
                        fontsize=7, ha="right", va="center")
    fig.suptitle(f"CHC: {h['n_topics']} topics, {h['n_items']} images, noise {100 * h['noise']['share']:.0f}% "
                 f"of captions (largest {len(topics)} topics; {per_domain} images per visual domain)", fontsize=8)
    fig.tight_layout(rect=(0.06, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())  # never a half-written picture
