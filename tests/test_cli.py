"""CLI end to end in a temp folder: demo, meta-train -> tune -> eval -> inspect, yaml config, errors."""

import json

import pytest

from gram_plugin.cli import main


FAST = ["--quiet", "--epochs", "2", "--threads", "1", "--backbone", "tiny"]
META = ["--meta-steps", "2", "--inner-steps", "1"]


def tiny_corpus_init(tmp_path):
    """An init + regulator for the tiny backbone (the shipped corpus init is ProxyCLIP v2's): the demo's
    plumbing is what these tests check; tests/test_corpus_init.py checks the shipped file."""
    assert main(["meta-train", "--out", str(tmp_path / "tiny-init"), "--quiet", "--threads", "1", "--backbone", "tiny",
                 *META, "--n-way", "3", "--k-support", "2", "--k-query", "4"]) == 0
    return tmp_path / "tiny-init" / "init.safetensors"


def test_demo_writes_metrics_and_plot(tmp_path, capsys, monkeypatch):
    import gram_plugin.cli.run_folder as run_folder

    drawn = {}
    plot = run_folder.Run.plot
    monkeypatch.setattr(run_folder.Run, "plot", lambda self, curves, **kw: drawn.update(kw) or plot(self, curves, **kw))
    out, init = tmp_path / "demo", tiny_corpus_init(tmp_path)
    assert main(["demo", "--out", str(out), *FAST, *META, "--corpus-init", str(init)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"zero-shot", "coop", "coop+gram(corpus)", "coop+gram(base classes)"}
    for method in ("coop", "coop+gram(corpus)", "coop+gram(base classes)"):
        final = metrics["final"][method]
        assert set(final) == {"base", "new", "H", "all"}
        assert all(0.0 <= v <= 1.0 for v in final.values())
        assert len(metrics["per_epoch"][method]) == 2
    assert metrics["corpus_init"]["file"] == str(init)
    # the corpus init is applied: its tuning starts from it, so it differs from CoOp's from "a photo of a"
    assert metrics["per_epoch"]["coop+gram(corpus)"] != metrics["per_epoch"]["coop"]
    zero = metrics["final"]["zero-shot"]
    assert drawn["lines"] == {"zero-shot base": zero["base"], "zero-shot new": zero["new"]}
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "init.safetensors").exists() and (out / "config.yaml").exists() and (out / "log.txt").exists()
    table = capsys.readouterr().out
    assert "CoOp+GRAM(corpus)" in table and "CoOp+GRAM(base classes)" in table and "zero-shot" in table


def test_demo_refuses_a_corpus_init_for_another_backbone_before_writing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST, *META]) == 2  # the shipped init is ProxyCLIP v2's
    err = capsys.readouterr().err
    assert "--corpus-init" in err and "does not fit the demo's model" in err and "meta-train --tasks chc:CORPUS" in err
    assert not out.exists()
    assert main(["demo", "--out", str(out), *FAST, *META, "--corpus-init", str(tmp_path / "none.safetensors")]) == 2
    assert "--corpus-init file" in capsys.readouterr().err and not out.exists()


def test_meta_train_tune_eval_inspect_with_yaml(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("backbone: tiny\nepochs: 2\nmeta_steps: 2\ninner_steps: 1\nquiet: true\nthreads: 1\nshots: 8\n"
                   "n_way: 3\nk_support: 2\nk_query: 4\n")
    assert main(["meta-train", "--config", str(cfg), "--out", str(tmp_path / "m")]) == 0
    init = tmp_path / "m" / "init.safetensors"
    assert main(["tune", "--config", str(cfg), "--out", str(tmp_path / "t"), "--init", str(init), "--prograd", "1"]) == 0
    tuned = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert len(tuned["per_epoch"]) == 2 and (tmp_path / "t" / "accuracy.png").exists()
    prompt = tmp_path / "t" / "prompt.safetensors"
    assert main(["eval", "--config", str(cfg), "--out", str(tmp_path / "e"), "--prompt", str(prompt)]) == 0
    ev = json.loads((tmp_path / "e" / "metrics.json").read_text())["final"]
    # eval of the saved prompt reproduces tune's final numbers (same split, same prompt)
    assert ev == pytest.approx(tuned["final"])
    capsys.readouterr()
    assert main(["inspect", str(init)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["method"] == "gram" and described["has_regulator"] is True
    assert described["shapes"]["ctx"] == [4, 32]


def test_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    assert main(["tune", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown options" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "z"), "--backbone", f"proxy-v1:{tmp_path / 'no-proxy'}", *FAST[:-2]]) == 2
    assert "no built proxy" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "y"), "--data", str(tmp_path / "nowhere"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_default_comes_from_the_config_dataclasses(tmp_path):
    import dataclasses

    from gram_plugin.cli import DEMO_SETTINGS, DataConfig, TaskConfig, build_parser, plan
    from gram_plugin.cli.options import STANDALONE_ONLY
    from gram_plugin.finetune import TuneConfig
    from gram_plugin.meta import MetaConfig
    from gram_plugin.models import PromptConfig

    parser = build_parser()
    option = {"steps": "meta_steps", "prograd_lambda": "prograd"}
    for command, classes in (("meta-train", (MetaConfig, DataConfig, TaskConfig)), ("tune", (TuneConfig, DataConfig)),
                             ("eval", (DataConfig,))):
        defaults = {a.dest: a.default for a in parser.commands[command]._actions}
        checked = 0
        for cls in classes:
            for f in dataclasses.fields(cls):
                name = option.get(f.name, f.name)
                if name in STANDALONE_ONLY:  # None: not given; plan fills in the dataclass's default
                    assert defaults[name] is None, (command, name)
                elif name in defaults:
                    assert defaults[name] == f.default, (command, f.name)
                    checked += 1
        assert checked == {"meta-train": 16, "tune": 7, "eval": 0}[command], (command, checked)
        # the prompt settings default to None: an init file may fix them, else PromptConfig's
        assert all(defaults[k] is None for k in ("mode", "n_ctx", "n_vpt", "vpt_deep", "ctx_init"))
        args = parser.parse_args([command, "--out", str(tmp_path / command)])
        p = plan(args)
        assert p.data == DataConfig(**({} if command != "eval" else {}))
        assert p.prompt == PromptConfig() and args.backbone == "proxy"
        if command == "meta-train":
            assert p.tasks == TaskConfig() and p.meta == MetaConfig()
    demo = {a.dest: a.default for a in parser.commands["demo"]._actions}
    assert {k: demo[k] for k in DEMO_SETTINGS} == DEMO_SETTINGS


def test_a_bug_keeps_its_traceback_an_error_of_gram_plugin_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    import gram_plugin.cli.meta_train as command
    from gram_plugin.data import DataError

    def shape_bug(*args, **kwargs):
        return torch.ones(2, 3) @ torch.ones(2, 3)  # a real torch RuntimeError, as a bug would raise

    monkeypatch.setattr(command, "meta_train", shape_bug)
    argv = ["meta-train", "--quiet", "--threads", "1", "--backbone", "tiny", *META]
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main([*argv, "--out", str(tmp_path / "bug")])

    def bad_input(*args, **kwargs):
        raise DataError("class 'pizza' has 1 image")

    monkeypatch.setattr(command, "meta_train", bad_input)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "one-line")]) == 2
    err = capsys.readouterr().err
    assert err == "gram-plugin: error: class 'pizza' has 1 image\n"
    with pytest.raises(DataError):  # --debug: the traceback of the same error
        main([*argv, "--out", str(tmp_path / "debug"), "--debug"])


def test_build_proxy_names_its_new_home(capsys):
    assert main(["build-proxy", "--out", "x"]) == 2
    assert "python tools/build_proxy.py --out DIR" in capsys.readouterr().err


# what each refusal says (today's messages, kept); {tmp} is the test's folder
REFUSED_BEFORE_TORCH = {
    "eval --prompt": (["eval", "--prompt", "{tmp}/missing.safetensors"], "init file {tmp}/missing.safetensors does not exist"),
    "tune --init folder": (["tune", "--init", "{tmp}"], "init file {tmp} is a folder, not a file"),
    "demo --corpus-init": (["demo", "--corpus-init", "{tmp}/missing.safetensors"],
                           "--corpus-init file {tmp}/missing.safetensors does not exist"),
    "meta-train --tasks chc:": (["meta-train", "--tasks", "chc:{tmp}/nowhere"], "corpus {tmp}/nowhere does not exist"),
    "tune --data folder:": (["tune", "--data", "folder:{tmp}/nowhere"], "image folder {tmp}/nowhere does not exist"),
    "eval --data caltech101:": (["eval", "--data", "caltech101:{tmp}/nowhere"], "no 101_ObjectCategories folder under {tmp}/nowhere"),
    "demo --data imagenet:": (["demo", "--data", "imagenet:{tmp}/nowhere"], "no classnames.txt under {tmp}/nowhere"),
    "tune --backbone proxy:": (["tune", "--backbone", "proxy:{tmp}"], "--backbone proxy takes no argument"),
    "tune --backbone weights": (["tune", "--backbone", "ViT-B-32:{tmp}/w.pt"], "weights file {tmp}/w.pt does not exist"),
    "chc --captions": (["chc", "--captions", "{tmp}/missing.txt"], "captions file {tmp}/missing.txt does not exist"),
    "chc --image-features": (["chc", "--captions", "{tmp}/captions.txt", "--image-features", "{tmp}/f.npy"],
                             "image features file {tmp}/f.npy does not exist"),
    "chc --corpus": (["chc", "--corpus", "{tmp}/nowhere"], "corpus {tmp}/nowhere does not exist"),
    "chc --backbone": (["chc", "--corpus", "{tmp}", "--backbone", "tiny:abc"], "--backbone tiny:SEED needs a whole-number seed"),
    "inspect": (["inspect", "{tmp}/missing.safetensors"], "init file {tmp}/missing.safetensors does not exist"),
}


@pytest.mark.parametrize("case", list(REFUSED_BEFORE_TORCH))
def test_a_missing_file_or_folder_or_a_bad_flag_value_is_refused_before_torch_is_imported(tmp_path, case):
    """The refusal comes from the plan / parse step, in a fresh interpreter (pytest's has torch): one message
    naming the file or flag, exit status 2, torch never imported, nothing written at --out."""
    import subprocess
    import sys

    (tmp_path / "captions.txt").write_text("a.jpg#0\ta dog on grass\nb.jpg#0\ta cat on a sofa\n")
    argv, says = REFUSED_BEFORE_TORCH[case]
    argv = [a.format(tmp=tmp_path) for a in argv] + ([] if argv[0] == "inspect" else ["--out", str(tmp_path / "out")])
    report = ("import json, sys\nfrom gram_plugin.cli import main\nstatus = main(sys.argv[1:])\n"
              "print(json.dumps({'torch imported': 'torch' in sys.modules}))\nsys.exit(status)")
    done = subprocess.run([sys.executable, "-c", report, *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 2 and says.format(tmp=tmp_path) in done.stderr, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"torch imported": False}
    assert not (tmp_path / "out").exists() and not (tmp_path / "chc-cache").exists()
