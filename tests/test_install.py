"""The package installs as `gram_plugin` + `gram_plugin.adapters` (never a top-level `adapters`),
both as a normal install imported from outside the repo and as an editable install."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, gram_plugin, gram_plugin.adapters as a; "
    "print(gram_plugin.__file__); print(a.__file__); "
    "print(importlib.util.find_spec('adapters') is None or 'site-packages/adapters' not in str(importlib.util.find_spec('adapters').origin))"
)


def _venv(path: Path) -> Path:
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    return path / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    # the venv's python runs the system pip; --no-deps: torch & co. come from the system site
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                   check=True, cwd="/")


@pytest.mark.slow
def test_wheel_layout_and_normal_install(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("gram_plugin-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gram_plugin/adapters/__init__.py" in names
    assert not any(n.startswith("adapters/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    # the shipped proxy build and the embedded images travel with the package
    assert {"gram_plugin/assets/proxy/proxy.safetensors", "gram_plugin/assets/proxy/card.json"} <= set(names)
    assert any(n.startswith("gram_plugin/assets/caltech10/") and n.endswith(".jpg") for n in names)
    # package data lives in gram_plugin/assets/, beside the data.py module without a same-named folder
    assert not any(n.startswith("gram_plugin/data/") for n in names)
    py = _venv(tmp_path / "venv")
    _pip(py, "--target", str(tmp_path / "site"), str(wheel))
    out = subprocess.run([str(py), "-c", PROBE], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and out[1].startswith(str(tmp_path / "site"))
    assert out[1].endswith("gram_plugin/adapters/__init__.py") and out[2] == "True"


@pytest.mark.slow
def test_editable_install_maps_adapters_folder(tmp_path):
    py = _venv(tmp_path / "venv")
    _pip(py, "-e", str(REPO))
    out = subprocess.run([str(py), "-c", PROBE], check=True, cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert out[0] == str(REPO / "gram_plugin" / "__init__.py")
    assert out[1] == str(REPO / "adapters" / "__init__.py")
    assert out[2] == "True"
