"""A missing optional dependency gives one line naming the extra that installs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gram_plugin import cli
from gram_plugin.extras import EXTRA_OF_MODULE, missing_extra_message

SETUP = (Path(__file__).resolve().parents[1] / "setup.py").read_text()


def test_every_named_extra_exists_in_setup_py():
    extras = set(re.findall(r'^\s+"(\w+)": \[', SETUP, re.M))
    assert {"clip", "chc", "proxy", "dassl", "dev"} <= extras
    assert set(EXTRA_OF_MODULE.values()) <= extras


@pytest.mark.parametrize("module,extra", [("umap", "chc"), ("transformers", "proxy"), ("open_clip", "clip"), ("yacs", "dassl")])
def test_cli_names_the_extra_in_one_line(module, extra, monkeypatch, capsys):
    def missing(*a, **k):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(cli, "parse", missing)
    assert cli.main(["inspect", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"gram-plugin: error: {module} is not installed; it comes with the '{extra}' extra: pip install \"gram-plugin[{extra}]\"\n"


def test_other_missing_modules_are_not_disguised(monkeypatch):
    def missing(*a, **k):
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(cli, "parse", missing)
    assert missing_extra_message(ModuleNotFoundError(name="not_an_extra")) is None
    with pytest.raises(ModuleNotFoundError, match="not_an_extra"):
        cli.main(["inspect", "x"])


def test_add_gram_cfg_without_yacs(monkeypatch):
    import sys

    from gram_plugin.adapters.config import add_gram_cfg

    monkeypatch.setitem(sys.modules, "yacs", None)
    monkeypatch.setitem(sys.modules, "yacs.config", None)
    with pytest.raises(ImportError, match=r"'dassl' extra: pip install \"gram-plugin\[dassl\]\""):
        add_gram_cfg(object())
