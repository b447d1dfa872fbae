"""``gram-plugin compare``'s library: Dassl base-to-new logs read, paired by seed, and the paired statistics.

The statistics are checked against hand computations (and scipy's t quantiles where installed); the
log reader on logs the real CoOp trainer wrote (integration: base training + new-class evaluation of
two configurations over two seeds, tiny CPU runs through CoOp's own ``train.py`` ``main``), and its
refusals on minimal Dassl-format logs.
"""

from __future__ import annotations

import math
import os
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from gram_plugin.stats import harmonic_mean, mean_sd, paired_difference, t_critical


def test_paired_difference_by_hand():
    d = paired_difference([71.0, 75.5, 70.0], [70.0, 74.0, 70.5])  # differences 1, 1.5, -0.5
    assert d.diffs == (1.0, 1.5, -0.5)
    assert d.mean == pytest.approx(2 / 3)
    sd = math.sqrt(((1 - 2 / 3) ** 2 + (1.5 - 2 / 3) ** 2 + (-0.5 - 2 / 3) ** 2) / 2)
    assert d.sd == pytest.approx(sd)
    assert d.t == pytest.approx((2 / 3) / (sd / math.sqrt(3)))
    assert d.improved == 2 and d.n == 3
    assert d.format() == f"+0.7 ± {sd:.1f} (t +{d.t:.1f}; 2/3 > 0)"
    one = paired_difference([2.0], [1.0])
    assert one.sd == 0 and math.isnan(one.t) and one.format() == "+1.0 ± 0.0 (t n/a; 1/1 > 0)"
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])
    assert mean_sd([3.0]) == (3.0, 0.0)
    assert harmonic_mean(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120) and harmonic_mean(0.0, 0.0) == 0.0


def test_t_critical_values_are_students_t():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (2, 3, 5, 10, 31):
        assert t_critical(n) == pytest.approx(scipy_stats.t.ppf(0.975, n - 1), abs=1e-3)
    assert t_critical(100) == 1.96 and math.isnan(t_critical(1))


# -- Dassl logs -----------------------------------------------------------------------------------------
def dassl_log(dataset="Caltech101", trainer="CoOp", config="vit_b16_ctxv1", classes="base", seed=1, shots=16,
              accuracy: float | None = 90.0, val: float | None = None, eval_only=False) -> str:
    """A log in Dassl's format (arguments, the printed config, result blocks), for the refusal tests."""
    lines = ["***************", "** Arguments **", "***************", f"config_file: configs/trainers/{trainer}/{config}.yaml",
             f"eval_only: {eval_only}", f"seed: {seed}", f"trainer: {trainer}", "************", "** Config **",
             "************", "DATASET:", f"  NAME: {dataset}", f"  NUM_SHOTS: {shots}", f"  SUBSAMPLE_CLASSES: {classes}",
             "MODEL:", "  BACKBONE:", "    NAME: ViT-B/16", f"SEED: {seed}", "TRAINER:", "  COOP:", "    N_CTX: 16",
             f"  NAME: {trainer}", "Collecting env info ..."]
    if val is not None:
        lines += ["Evaluate on the *val* set", "=> result", f"* accuracy: {val}%"]
    if accuracy is not None:
        lines += ["Finish training", "Evaluate on the *test* set", "=> result", "* total: 100", f"* accuracy: {accuracy}%"]
    return "\n".join(lines) + "\n"


def write_run(root: Path, split: str, config: str, seed: int, **kw) -> Path:
    folder = root / split / "caltech101" / "shots_16" / kw.get("trainer", "CoOp") / config / f"seed{seed}"
    folder.mkdir(parents=True)
    classes = "new" if split == "test_new" else "base"
    (folder / "log.txt").write_text(dassl_log(config=config, classes=classes, seed=seed, eval_only=split != "train_base", **kw))
    return folder


def method_dir(root: Path, config: str) -> Path:
    return root / "train_base" / "caltech101" / "shots_16" / "CoOp" / config


def test_read_log_takes_the_test_result_not_validation(tmp_path):
    from gram_plugin.adapters.dassl_results import read_log

    path = tmp_path / "log.txt"
    path.write_text(dassl_log(accuracy=81.5, val=99.0))
    run = read_log(path)
    assert (run.dataset, run.trainer, run.config, run.shots, run.classes, run.seed, run.accuracy) == \
        ("Caltech101", "CoOp", "vit_b16_ctxv1", 16, "base", 1, 81.5)
    path.write_text(dassl_log(accuracy=None, val=99.0))
    assert read_log(path).accuracy is None


def test_compare_pairs_by_seed_and_reports(tmp_path):
    from gram_plugin.adapters.dassl_results import compare

    acc = {("a", 1): (80.0, 60.0), ("a", 2): (82.0, 58.0), ("a", 3): (81.0, 70.0),
           ("b", 1): (81.0, 64.0), ("b", 2): (81.0, 63.0), ("b", 4): (90.0, 90.0)}
    for (m, seed), (base, new) in acc.items():
        write_run(tmp_path, "train_base", m, seed, accuracy=base)
        write_run(tmp_path, "test_new", m, seed, accuracy=new)
    c = compare(method_dir(tmp_path, "a"), tmp_path / "test_new" / "caltech101" / "shots_16" / "CoOp" / "b")
    assert c.seeds == [1, 2]
    assert c.rows()[0] == (1, 80.0, 60.0, harmonic_mean(80, 60), 81.0, 64.0, harmonic_mean(81, 64))
    assert c.diffs["new"].diffs == (4.0, 5.0) and c.diffs["base"].diffs == (1.0, -1.0)
    h = [harmonic_mean(81, 64) - harmonic_mean(80, 60), harmonic_mean(81, 63) - harmonic_mean(82, 58)]
    assert c.diffs["H"].diffs == pytest.approx(tuple(h))
    text = c.format()
    assert "A: CoOp/a on Caltech101, 16 shots" in text and "B: CoOp/b on Caltech101, 16 shots" in text
    assert re.search(r"new: \+4\.50 ± 0\.71 \(t \+9\.00; 2/2 > 0\)  -- 2 of 2 seeds improved", text), text
    assert "needs |t| > 12.71 with 2 seeds" in text
    assert "not paired: A's seed(s) 3" in text and "not paired: B's seed(s) 4" in text


def test_compare_refuses_what_it_cannot_pair(tmp_path):
    from gram_plugin.adapters.dassl_results import DasslResultsError, compare, read_method

    with pytest.raises(DasslResultsError, match="no such folder"):
        read_method(tmp_path / "nothing")
    write_run(tmp_path, "train_base", "a", 1)
    write_run(tmp_path, "train_base", "b", 1)
    with pytest.raises(DasslResultsError, match=r"holds runs of 2 methods \(CoOp/a on Caltech101, 16 shots; CoOp/b"):
        read_method(tmp_path)
    with pytest.raises(DasslResultsError, match=r"no seed has a base and a new result in both folders .*new seeds none"):
        compare(method_dir(tmp_path, "a"), method_dir(tmp_path, "b"))
    write_run(tmp_path, "train_base", "c", 1, accuracy=None)
    with pytest.raises(DasslResultsError, match=r"no Dassl log.txt with a test result .*\(1 log\(s\) without one\)"):
        read_method(method_dir(tmp_path, "c"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "log.txt").write_text("hello\n")
    with pytest.raises(DasslResultsError, match=r"x/log.txt: not a Dassl log"):
        read_method(tmp_path / "x")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from gram_plugin.adapters.dassl_results import compare

    for m in ("a", "b"):
        for seed in (1, 2):
            write_run(tmp_path, "train_base", m, seed, accuracy=80.0 + seed + (m == "b"))
            write_run(tmp_path, "test_new", m, seed, accuracy=60.0 - seed)
    out = compare(method_dir(tmp_path, "a"), method_dir(tmp_path, "b")).plot(tmp_path / "plot" / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- logs the real CoOp trainer wrote --------------------------------------------------------------------
from fixtures.upstream import caltech_folder, coop, weights_dir  # noqa: E402,F401  (fixtures)


@pytest.mark.integration
def test_compare_reads_logs_the_real_coop_wrote(coop, caltech_root, tmp_path, monkeypatch):
    """CoOp's train.py main, as the base2new scripts call it: train on the base classes (its log ends with
    the base test), then --eval-only on the new classes, for two configs and two seeds; compare reads
    back exactly the accuracies the trainer's test() returned."""
    from gram_plugin.adapters.dassl_results import compare

    data = caltech_folder(caltech_root, tmp_path / "data", 8)
    from gram_plugin.adapters import add_gram_cfg

    monkeypatch.setattr(coop.train, "collect_env_info", lambda: "(not collected in the test)")
    extend_cfg = coop.train.extend_cfg  # the fork's one line: add_gram_cfg at the end of extend_cfg
    monkeypatch.setattr(coop.train, "extend_cfg", lambda cfg: (extend_cfg(cfg), add_gram_cfg(cfg)))
    returned = {}
    real_build = coop.train.build_trainer

    def build_and_record(cfg):
        trainer = real_build(cfg)
        test = trainer.test
        trainer.test = lambda *a, **k: returned.__setitem__((cfg.OUTPUT_DIR, "acc"), test(*a, **k)) or returned[(cfg.OUTPUT_DIR, "acc")]
        return trainer

    monkeypatch.setattr(coop.train, "build_trainer", build_and_record)
    small = ["DATASET.NUM_SHOTS", "1", "INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", "1", "DATALOADER.NUM_WORKERS", "0",
             "DATALOADER.TEST.BATCH_SIZE", "50", "GRAM.CLIP_WEIGHTS", "random"]
    root = tmp_path / "output" / "base2new"
    for config in ("vit_b16_ctxv1", "vit_b16_ep50_ctxv1"):
        for seed in (1, 2):
            common = Path("caltech101") / "shots_16" / "CoOp" / config / f"seed{seed}"
            for sub, extra in (("base", {}), ("new", {"eval_only": True, "model_dir": str(root / "train_base" / common), "load_epoch": 1})):
                out = root / ("train_base" if sub == "base" else "test_new") / common
                args = Namespace(root=str(data), output_dir=str(out), resume="", seed=seed, source_domains=None,
                                 target_domains=None, transforms=None, trainer="CoOp", backbone="", head="",
                                 config_file=str(coop.root / "configs/trainers/CoOp" / f"{config}.yaml"),
                                 dataset_config_file=str(coop.root / "configs/datasets/caltech101.yaml"),
                                 model_dir=extra.get("model_dir", ""), load_epoch=extra.get("load_epoch"),
                                 eval_only=extra.get("eval_only", False), no_train=False,
                                 opts=[*small, "DATASET.SUBSAMPLE_CLASSES", sub])
                console = sys.stdout
                coop.train.main(args)
                logger, sys.stdout = sys.stdout, console  # each run's Dassl logger writes its own log.txt only
                logger.file.close()
                logger.console = open(os.devnull, "w")  # it closes the stream it wraps when collected

    a = root / "train_base" / "caltech101" / "shots_16" / "CoOp" / "vit_b16_ctxv1"
    b = root / "train_base" / "caltech101" / "shots_16" / "CoOp" / "vit_b16_ep50_ctxv1"
    c = compare(a, b)
    assert c.seeds == [1, 2]
    for folder, m in ((a, c.a), (b, c.b)):
        for seed in (1, 2):
            base_out = str(folder / f"seed{seed}")
            new_out = base_out.replace("train_base", "test_new")
            assert m.base[seed] == pytest.approx(round(returned[(base_out, "acc")], 1))
            assert m.new[seed] == pytest.approx(round(returned[(new_out, "acc")], 1))
    assert c.a.method == ("Caltech101", "CoOp", "vit_b16_ctxv1", 1)  # DATASET.NUM_SHOTS as run, not the folder name
    text = c.format()
    assert "B - A, paired over 2 seeds (1, 2)" in text
    assert "A and B ran on a random CLIP (GRAM.CLIP_WEIGHTS random): these accuracies mean nothing" in text
