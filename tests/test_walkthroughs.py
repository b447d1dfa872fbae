"""The walk-throughs' commands as written, against the real upstream trainers (as tests/test_readme_code.py
runs the README's Python blocks).

Every ``bash`` block of examples/coop_fork/README.md and examples/vpt_family/README.md runs in order, in
one bash session per README, as a user pastes them, with these rules (the markers are HTML comments in
front of a block, so the reader sees the same commands):

* ``<!-- environment -->`` defines ``GRAM``, ``DATA``, ``SHARED``: the test sets those itself (``GRAM``
  this checkout, ``HOME`` and ``DATA`` in a temp folder, ``SHARED`` a folder of the same snapshots and
  data archives as ../shared, the data archives cut to a few classes for CPU time).
* ``<!-- install -->`` installs packages into the running environment: not run here (the package is
  installed already; tests/test_install.py covers installing it; the READMEs record a fresh venv).
* ``<!-- developers -->``: commands for gram-plugin's developers (running its CI), not the walk-through's.
* every other block runs with the smoke options appended as the README says: ``$META_SMOKE $SMOKE`` to
  each ``gram-plugin meta-train`` / ``scripts/gram/meta_train.sh`` command, ``$SMOKE`` to each
  ``train.py`` / ``scripts/gram/base2new*.sh`` command (``SMOKE`` and ``META_SMOKE`` come from the
  README's own ``<!-- smoke -->`` block).
* ``<!-- offline-fails: TEXT -->``: the block also runs once as written with the network unreachable
  (``https_proxy`` on a closed port), in a scratch copy of the current folder, and must fail with TEXT
  in its output.
* the fork's ``train.py`` gets the lines of the README's Python block that shows them (``add_gram_cfg``,
  ``patch_dassl()``, ``print(wrap(trainer))``), added where the block says, when the text reaches it.

The cut archives keep 6 (or 4) classes: half of them are base classes, and the smoke tasks are 3-way.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fixtures.upstream import ROOT_VARS, import_dassl

REPO = Path(__file__).resolve().parents[1]
WALKTHROUGHS = [REPO / "examples" / "coop_fork" / "README.md", REPO / "examples" / "vpt_family" / "README.md"]
BLOCK = re.compile(r"(?:<!-- (?P<tag>[\w-]+)(?::\s*(?P<arg>.*?))? -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
META = re.compile(r"^\s*(gram-plugin meta-train|bash scripts/gram/meta_train\.sh)\b")
TRAIN = re.compile(r"^\s*(python3? train\.py|bash scripts/gram/base2new\w*\.sh)\b")
SNAPSHOTS = ("CoOp", "Dassl.pytorch", "multimodal-prompt-learning", "PromptSRC")


def blocks(path: Path) -> list[dict]:
    """The fenced blocks of a README in order: tag and argument of the marker in front, language, code, where."""
    text = path.read_text(encoding="utf-8")
    return [dict(tag=m.group("tag") or "", arg=m.group("arg") or "", lang=m.group("lang"), code=m.group("code"),
                 where=f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}") for m in BLOCK.finditer(text)]


def with_smoke_options(code: str) -> str:
    """The block with the smoke options appended to each command the README names (continuation lines
    joined; a trailing comment kept out of the command)."""
    out, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        command, sep, comment = line.partition("  #")
        if META.match(command):
            command = command.rstrip() + " $META_SMOKE $SMOKE"
        elif TRAIN.match(command):
            command = command.rstrip() + " $SMOKE"
        out.append(command + (sep + comment if sep else ""))
    return "\n".join(out) + "\n"


def offline_check(code: str, expected: str, n: int) -> str:
    """Shell lines: run ``code`` with the network unreachable, in a scratch copy of the current folder (what it
    leaves behind is not the walk-through's); it must fail with ``expected`` in its output."""
    log = f"$WALK_LOGS/offline_{n}.log"
    scratch = f"$WALK_LOGS/offline_{n}_cwd"
    return (f"cp -r . {scratch}\n"
            f"if ( cd {scratch} && export https_proxy=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 "
            f"HTTPS_PROXY=http://127.0.0.1:9\n"
            f"{code}) > {log} 2>&1; then echo 'walkthrough: expected to fail offline' >&2; exit 97; fi\n"
            f"grep -qF {shlex.quote(expected)} {log} || {{ cat {log} >&2; echo 'walkthrough: not the predicted message' >&2; exit 98; }}\n"
            f"echo \"walkthrough: offline as predicted: $(grep -F {shlex.quote(expected)} {log} | tail -1)\"\n")


THREE_LINES_HELPER = r'''
import re, sys
from pathlib import Path
block = Path(sys.argv[1]).read_text()
imports = [l.split("#")[0].rstrip() for l in block.splitlines() if l.startswith("from gram_plugin")]
cfg_line = next(l.split("#")[0].strip() for l in block.splitlines() if l.strip().startswith("add_gram_cfg(cfg)"))
before = [l.split("#")[0].strip() for l in block.splitlines() if l.strip().startswith("patch_dassl(")]
after = [l.split("#")[0].strip() for l in block.splitlines() if "wrap(trainer)" in l and not l.startswith(("from", "import"))]
for train in sys.argv[2:]:
    path = Path(train)
    s = path.read_text()
    if "gram_plugin" in s:
        continue
    lines = s.splitlines()
    last_import = max(i for i, l in enumerate(lines) if re.match(r"(import|from) ", l))
    lines[last_import + 1:last_import + 1] = imports
    start = next(i for i, l in enumerate(lines) if l.startswith("def extend_cfg("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "\t")))
    while not lines[end - 1].strip():
        end -= 1
    lines.insert(end, "    " + cfg_line)
    i = next(i for i, l in enumerate(lines) if l.strip() == "trainer = build_trainer(cfg)")
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i:i + 1] = [indent + l for l in before] + [lines[i]] + [indent + l for l in after]
    path.write_text("\n".join(lines) + "\n")
    print(f"walkthrough: added the README's lines to {path}")
'''


def walkthrough_script(readme_blocks: list[dict], work: Path) -> str:
    """The bash script the README's blocks make, under the rules of this module's docstring."""
    parts = ["set -eo pipefail", "echo \"walkthrough: $(date +%T) start\""]
    seen_three_lines = False
    for n, b in enumerate(readme_blocks):
        where = b["where"]
        if b["lang"] == "python":
            if "add_gram_cfg(cfg)" in b["code"] and "build_trainer(cfg)" in b["code"] and not seen_three_lines:
                seen_three_lines = True
                block_file = work / f"three_lines_{n}.py"
                block_file.write_text(b["code"])
                parts.append(f"echo 'walkthrough: {where} (train.py edit)'\n"
                             f"\"$WALK_PYTHON\" \"$WALK_HELPER\" {block_file} $(ls ~/src/*/train.py)")
            continue
        if b["lang"] != "bash" or b["tag"] in ("environment", "install", "developers"):
            continue
        parts.append(f"echo \"walkthrough: $(date +%T) {where}\"")
        if b["tag"] == "offline-fails":
            parts.append(offline_check(b["code"], b["arg"], n))
        parts.append(b["code"] if b["tag"] == "smoke" else with_smoke_options(b["code"]))
    parts.append("echo \"walkthrough: $(date +%T) done\"")
    return "\n".join(parts) + "\n"


def cut_archive(src: Path, dest: Path, keep: int) -> None:
    """``src`` with only the first ``keep`` class folders of each split (everything else as is)."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        members = tin.getmembers()
        classes = {}
        for m in members:
            parts = Path(m.name).parts
            for i, p in enumerate(parts[:-1]):
                if p in ("101_ObjectCategories", "train", "val") and i + 1 < len(parts) - (0 if m.isdir() else 1):
                    classes.setdefault(parts[: i + 1], set()).add(parts[i + 1])
        kept = {k: set(sorted(c - {"BACKGROUND_Google", "Faces_easy"})[:keep]) for k, c in classes.items()}
        for m in members:
            parts = Path(m.name).parts
            drop = any(parts[: len(k)] == k and len(parts) > len(k) and parts[len(k)] not in v for k, v in kept.items())
            if not drop:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)


@pytest.fixture(scope="module")
def make_shared(tmp_path_factory):
    """``make_shared(caltech=N, imagenet=M)``: a SHARED folder like ../shared, the upstream snapshots and the
    data archives cut to N / M classes (half of them base classes)."""
    import_dassl()
    from conftest import SHARED_DATA

    # the snapshots live beside the shared data (../shared/upstream and ../shared/data; GRAM_SHARED_DATA moves both)
    upstream_dir = Path(os.environ.get("GRAM_UPSTREAM_SNAPSHOTS", SHARED_DATA.parent / "upstream"))
    if not all(os.environ.get(v) for v in ROOT_VARS):
        pytest.skip(f"the walk-throughs need all of {', '.join(ROOT_VARS)} (bash .ci/upstream.sh)")
    missing = [n for n in SNAPSHOTS if not (upstream_dir / f"{n}.tar").exists()]
    if missing or not (SHARED_DATA / "caltech-101.tar").exists():
        pytest.skip(f"the walk-throughs unpack the snapshots {upstream_dir}/*.tar (GRAM_UPSTREAM_SNAPSHOTS) and the "
                    f"data in {SHARED_DATA}: missing {missing or 'caltech-101.tar'}")

    def make(caltech: int, imagenet: int) -> Path:
        root = tmp_path_factory.mktemp("shared")
        (root / "upstream").mkdir()
        (root / "data").mkdir()
        for name in SNAPSHOTS:
            (root / "upstream" / f"{name}.tar").symlink_to(upstream_dir / f"{name}.tar")
        for archive, keep in (("caltech-101.tar", caltech), ("imagenet-mini.tar", imagenet)):
            cut_archive(SHARED_DATA / archive, root / "data" / archive, keep)
        return root

    return make


def run_walkthrough(readme_blocks: list[dict], shared: Path, tmp_path: Path, timeout: float) -> str:
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "logs").mkdir()
    helper = tmp_path / "three_lines.py"
    helper.write_text(THREE_LINES_HELPER)
    script = tmp_path / "walkthrough.sh"
    script.write_text(walkthrough_script(readme_blocks, tmp_path))
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAM_COOP", "GRAM_MPL", "GRAM_PROMPTSRC", "PYTEST"))}
    env.update(HOME=str(home), GRAM=str(REPO), SHARED=str(shared), DATA=str(home / "datasets"),
               PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", WALK_PYTHON=sys.executable, WALK_HELPER=str(helper),
               WALK_LOGS=str(tmp_path / "logs"), OUTDATED_IGNORE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GRAM_CLIP_CACHE=str(tmp_path / "clip_cache"))
    if shutil.which("gram-plugin", path=env["PATH"]) is None:  # an environment without the console script
        (tmp_path / "bin").mkdir()
        shim = tmp_path / "bin" / "gram-plugin"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c 'import sys; from gram_plugin.cli import main; sys.exit(main())' \"$@\"\n")
        shim.chmod(0o755)
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    t0 = time.time()
    log = tmp_path / "walkthrough.log"  # written as it runs: tail it to follow a slow run
    with open(log, "w") as f:
        proc = subprocess.run(["bash", str(script)], cwd=home, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, (f"{readme_blocks[-1]['where']}: exit {proc.returncode} after {time.time() - t0:.0f} s; "
                                  f"last output:\n{out[-6000:]}")
    return out


# -- the scripts, with a stand-in python that records what train.py would be given ---------------------------
SCRIPTS = REPO / "examples" / "scripts"


@pytest.fixture
def fork_with_recorder(tmp_path):
    """A fork root with a config, and a ``python`` first on PATH that writes its arguments to calls.txt."""
    fork = tmp_path / "fork"
    (fork / "configs/trainers/CoCoOp").mkdir(parents=True)
    (fork / "configs/trainers/CoCoOp/c.yaml").write_text("OPTIM:\n  NAME: sgd\n  MAX_EPOCH: 10  # CoCoOp's\n")
    (fork / "scripts").symlink_to(SCRIPTS)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "python"
    recorder.write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {tmp_path}/args.txt\n"
                        f"echo \"$*\" >> {tmp_path}/calls.txt\n")
    recorder.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DATA=str(tmp_path / "data"))
    return fork, env, tmp_path


def run_script(fork, env, *args):
    return subprocess.run(["bash", *map(str, args)], cwd=fork, env=env, capture_output=True, text=True)


def test_scripts_pass_key_value_options_through_to_train_py(fork_with_recorder):
    fork, env, tmp = fork_with_recorder
    r = run_script(fork, env, "scripts/base2new_train.sh", "caltech101", "2", "CoCoOp", "c",
                   "OPTIM.MAX_EPOCH", "1", "INPUT.SIZE", "(32,32)", "DATASET.NUM_SHOTS", "4")
    assert r.returncode == 0, r.stderr
    args = (tmp / "args.txt").read_text().splitlines()
    assert args[0] == "train.py" and args[args.index("--seed") + 1] == "2"
    assert args[args.index("--output-dir") + 1] == "output/base2new/train_base/caltech101/shots_4/CoCoOp/c/seed2"
    # the script's own options first, the user's after them (the last value of a key wins in yacs)
    assert args[-8:] == ["DATASET.SUBSAMPLE_CLASSES", "base", "OPTIM.MAX_EPOCH", "1", "INPUT.SIZE", "(32,32)",
                         "DATASET.NUM_SHOTS", "4"]

    # the test loads the last epoch: the option's, else the config's (CoCoOp: 10, not CoOp's 200)
    (fork / "output/base2new/train_base/caltech101/shots_4/CoCoOp/c/seed2").mkdir(parents=True, exist_ok=True)
    for extra, epoch in ((["OPTIM.MAX_EPOCH", "1"], "1"), ([], "10")):
        r = run_script(fork, env, "scripts/base2new_test.sh", "caltech101", "2", "CoCoOp", "c",
                       "DATASET.NUM_SHOTS", "4", *extra)
        assert r.returncode == 0, r.stderr
        args = (tmp / "args.txt").read_text().splitlines()
        assert args[args.index("--load-epoch") + 1] == epoch
        assert args[args.index("--model-dir") + 1] == "output/base2new/train_base/caltech101/shots_4/CoCoOp/c/seed2"
        assert args[-2:] == ["GRAM.ENABLED", "False"] and args[-4 - len(extra):-2] == ["DATASET.NUM_SHOTS", "4", *extra]
        (tmp / "args.txt").unlink()  # (the stand-in python creates no output folder, so no run is skipped)


def test_scripts_refuse_odd_options_and_a_missing_data_variable(fork_with_recorder):
    fork, env, tmp = fork_with_recorder
    r = run_script(fork, env, "scripts/base2new_train.sh", "caltech101", "1", "CoCoOp", "c", "OPTIM.MAX_EPOCH")
    assert r.returncode == 2 and "usage:" in r.stderr and not (tmp / "calls.txt").exists()
    r = run_script(fork, {k: v for k, v in env.items() if k != "DATA"}, "scripts/base2new.sh", "caltech101", "1", "CoCoOp", "c")
    assert r.returncode != 0 and "set DATA to the datasets folder" in r.stderr and not (tmp / "calls.txt").exists()


def test_smoke_options_are_appended_where_the_readme_says():
    code = ("gram-plugin meta-train --dassl-config a.yaml \\\n    --out x.safetensors\n"
            "for S in 1 2; do\n    bash scripts/gram/base2new.sh caltech101 $S CoOp c  # a comment\ndone\n"
            "gram-plugin compare a b\ncp -r x y\n")
    assert with_smoke_options(code) == (
        "gram-plugin meta-train --dassl-config a.yaml      --out x.safetensors $META_SMOKE $SMOKE\n"
        "for S in 1 2; do\n    bash scripts/gram/base2new.sh caltech101 $S CoOp c $SMOKE  # a comment\ndone\n"
        "gram-plugin compare a b\ncp -r x y\n")


def test_the_walkthroughs_have_the_blocks_this_test_runs():
    for readme in WALKTHROUGHS:
        tags = [b["tag"] for b in blocks(readme)]
        assert "install" not in tags or readme.parent.name == "coop_fork"
        code = "".join(b["code"] for b in blocks(readme) if b["lang"] == "bash")
        assert "gram-plugin compare" in code and "scripts/gram/base2new" in code, readme
    coop = blocks(WALKTHROUGHS[0])
    assert {"environment", "install", "smoke", "offline-fails"} <= {b["tag"] for b in coop}


@pytest.mark.integration
@pytest.mark.slow
def test_coop_fork_walkthrough_runs_as_written(make_shared, tmp_path):
    shared = make_shared(caltech=6, imagenet=6)  # 3 base classes: the smoke tasks are 3-way
    out = run_walkthrough(blocks(WALKTHROUGHS[0]), shared, tmp_path, timeout=1500)
    assert "walkthrough: offline as predicted: gram-plugin: error: the CLIP weights for ViT-B/16 were being downloaded" in out
    assert out.count("walkthrough: added the README's lines to") == 1
    fork = tmp_path / "home" / "src" / "CoOp"
    for init in ("coop_vit_b16_nctx4", "cocoop_vit_b16_nctx4"):
        assert (fork / "inits" / init / "init.safetensors").is_file(), init
    # the GRAM runs started from step 2's init (wrap printed it), the comparison paired three seeds
    log = (fork / "output/base2new/train_base/caltech101/shots_16/CoOp/vit_b16_ctxv1_gram/seed1/log.txt").read_text()
    assert "inits/coop_vit_b16_nctx4/init.safetensors" in log and "GramWrap(" in log
    assert "B - A, paired over 3 seeds (1, 2, 3), points:" in out
    assert "A and B ran on a random CLIP (GRAM.CLIP_WEIGHTS random)" in out
    assert (fork / "output" / "compare_coop_gram.png").is_file()
    for trainer, cfg in (("CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1_gram"), ("CoOp", "vit_b16_ctxv1_prograd")):
        new_log = fork / f"output/base2new/test_new/caltech101/shots_16/{trainer}/{cfg}/seed1/log.txt"
        assert "* accuracy:" in new_log.read_text(), new_log


@pytest.mark.integration
@pytest.mark.slow
def test_vpt_family_walkthrough_runs_as_written(make_shared, tmp_path):
    # meta-training on ImageNet's 3 base classes (3-way smoke tasks); base-to-new on 2 + 2 Caltech101
    # classes: MaPLe's 512 / 768-wide random CLIP in fp16 costs ~30 s a batch of 4 on a loaded 2-core CPU
    shared = make_shared(caltech=4, imagenet=6)
    # a user of this README has done ../coop_fork section 0: its data and smoke-option blocks first
    coop = blocks(WALKTHROUGHS[0])
    section0 = [b for b in coop if b["tag"] == "smoke" or (b["lang"] == "bash" and "caltech-101.tar" in b["code"])]
    assert len(section0) == 2, section0
    out = run_walkthrough([dict(section0[0], code="mkdir -p $DATA\n" + section0[0]["code"]), section0[1],
                           *blocks(WALKTHROUGHS[1])], shared, tmp_path, timeout=2400)
    assert out.count("walkthrough: added the README's lines to") == 2
    src = tmp_path / "home" / "src"
    for fork, name in (("multimodal-prompt-learning", "IVLP_imagenet_gram"), ("multimodal-prompt-learning", "VPT_imagenet_gram"),
                       ("multimodal-prompt-learning", "MaPLe_imagenet"), ("PromptSRC", "PromptSRC_imagenet")):
        assert (src / fork / "inits" / name / "init.safetensors").is_file(), name
    assert "B - A, paired over 3 seeds (1, 2, 3), points:" in out
    for fork, trainer, cfg in (("multimodal-prompt-learning", "VPT", "vit_b16_c2_ep5_batch4_4_gram"),
                               ("multimodal-prompt-learning", "MaPLe", "vit_b16_c2_ep5_batch4_2ctx_gram"),
                               ("PromptSRC", "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx_gram")):
        new_log = src / fork / f"output/base2new/test_new/caltech101/shots_16/{trainer}/{cfg}/seed1/log.txt"
        assert "* accuracy:" in new_log.read_text(), new_log
