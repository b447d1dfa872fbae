"""``meta-train --tasks chc:CORPUS``: GRAM's tasks from an image-caption corpus, in the run folder (both paths).

The corpus was read and checked by :func:`gram_plugin.cli.plan.plan`. Here, once the run folder is
open: the corpus images' features (the frozen image tower; cached), CHC over the captions with those
features, ``OUT/hierarchy.json`` + ``hierarchy.txt`` + ``hierarchy.png``, and the task source. On
``--resume`` the run's own ``hierarchy.json`` is reused (the same topics and domains as before the
interruption), after checking it was built from these captions.
"""

from __future__ import annotations

import time

from ..errors import GramPluginError
from .options import CLIError


def corpus_hierarchy(plan, run, cache_dir, *, backbone=None, features=None, features_from=None, resume: bool = False):
    """The run's :class:`~gram_plugin.chc.CorpusCHC`: built and written into the run folder, or on
    ``resume`` read back from it. Give the standalone ``backbone`` (features through the feature cache in
    ``cache_dir``) or the ``features`` (n_images, dim) computed by the caller (the Dassl path) with
    ``features_from`` saying what made them (recorded in the hierarchy).

    Raises ``CLIError`` when the run's hierarchy was built from other captions."""
    from ..chc import CorpusCHC, captions_hash, corpus_chc, corpus_features, load_hierarchy, summary, write_hierarchy

    corpus, path = plan.corpus, run.path("hierarchy.json")
    if resume and path.is_file():
        h = load_hierarchy(path)
        if h.get("captions_sha256") != captions_hash(corpus.captions) or h.get("n_items") != len(corpus):
            raise CLIError(f"--resume: {path} was built from other captions or images than {corpus.root} holds now; "
                           "meta-train it again into a new --out")
        if features is None and backbone is not None:
            features = corpus_features(corpus, backbone, cache_dir, progress=plan.chc.progress)
        run.log(f"CHC: reusing {path} ({h['n_topics']} topics)")
        return CorpusCHC(corpus, features, h)
    t0 = time.perf_counter()
    result = corpus_chc(corpus, backbone, plan.chc, cache_dir=cache_dir, features=features, features_from=features_from)
    written = write_hierarchy(result.hierarchy, corpus, path, overwrite=True)  # the run folder is this run's
    run.log(f"CHC of {corpus.root} ({corpus.n_captions} captions, {len(corpus)} images) in "
            f"{time.perf_counter() - t0:.1f}s: {summary(result.hierarchy, top=8)}")
    run.log(f"wrote {', '.join(p.name for p in written)}")
    return result


def corpus_task_source(plan, result, **images):
    """The task source of ``--n-way`` topics, ``--k-support`` images from one domain, ``--k-query`` from all;
    ``images``: ``transform=`` or ``dataset=`` to draw images instead of the features. Raises ``CLIError``
    (in the flags' words) when too few topics can fill a task."""
    t = plan.tasks
    try:
        return result.task_source(t.n_way, t.k_support, t.k_query, **images)
    except GramPluginError as e:
        message = str(e).replace("lower n_way / shots / queries", "lower --n-way / --k-support / --k-query")
        message = message.replace("min_cluster_size (--min-cluster-size, this", "--min-cluster-size (this")
        raise CLIError(f"--tasks chc:{t.corpus}: {message} (the topics: hierarchy.txt in --out)") from None
