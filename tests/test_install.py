"""The package installs as `gram_plugin` + `gram_plugin.adapters` (never a top-level `adapters`),
both as a normal install imported from outside the repo and as an editable install.

The install venvs see the *running* interpreter's packages (torch, pip, setuptools), whether pytest
runs inside a virtualenv or outside one: ``system_site_packages`` would give them the base
interpreter's site, which has no torch when the project was installed into a venv. They get a
``.pth`` file listing the running interpreter's site-packages folders as plain paths instead, so
those folders' own ``.pth`` files -- the running environment's editable gram-plugin among them --
are not executed and cannot shadow the install under test.
"""

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.metadata, importlib.util, gram_plugin, gram_plugin.adapters as a, gram_plugin.cli, torch; "
    "print(gram_plugin.__file__); print(a.__file__); "
    "print(importlib.util.find_spec('adapters') is None or 'site-packages/adapters' not in str(importlib.util.find_spec('adapters').origin)); "
    "print(importlib.metadata.distribution('gram-plugin').locate_file(''))"
)


def running_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests (venv or not)."""
    return [p for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")]


def _venv(path: Path) -> Path:
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "zz_running_interpreter.pth").write_text("\n".join(running_site_dirs()) + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    # the venv's python runs the running interpreter's pip; --no-deps: torch & co. come from its site
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                   check=True, cwd="/")


@pytest.mark.slow
def test_wheel_layout_and_normal_install(tmp_path):
    # from a copy without the checkout's build/ folder: setuptools would pack stale files left there
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns("build", "*.egg-info", ".git", "runs", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("gram_plugin-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gram_plugin/adapters/__init__.py" in names
    assert {"gram_plugin/chc/hierarchy.py", "gram_plugin/cli/meta_train.py", "gram_plugin/backbones/proxy_v2.py"} <= set(names)  # subpackages travel too
    assert not any(n.endswith(("build_proxy.py", "proxy_build.py", "make_embedded.py")) for n in names)  # build scripts stay in tools/
    assert not any(n.startswith("adapters/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    # the shipped proxy build and the embedded images travel with the package
    assert {"gram_plugin/assets/proxy/proxy.safetensors", "gram_plugin/assets/proxy/card.json"} <= set(names)
    # the demo's corpus init and the manifest with the command that made it
    assert {"gram_plugin/assets/corpus_init/init.safetensors", "gram_plugin/assets/corpus_init/manifest.json"} <= set(names)
    assert any(n.startswith("gram_plugin/assets/caltech10/") and n.endswith(".jpg") for n in names)
    # package data lives in gram_plugin/assets/, beside the data.py module without a same-named folder
    assert not any(n.startswith("gram_plugin/data/") for n in names)
    py = _venv(tmp_path / "venv")
    _pip(py, "--target", str(tmp_path / "site"), str(wheel))
    out = subprocess.run([str(py), "-c", PROBE], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and out[1].startswith(str(tmp_path / "site"))
    assert out[1].endswith("gram_plugin/adapters/__init__.py") and out[2] == "True"
    assert out[3].startswith(str(tmp_path / "site"))  # the installed distribution, not the running one


@pytest.mark.slow
def test_editable_install_maps_adapters_folder(tmp_path):
    py = _venv(tmp_path / "venv")
    _pip(py, "-e", str(REPO))
    out = subprocess.run([str(py), "-c", PROBE], check=True, cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert out[0] == str(REPO / "gram_plugin" / "__init__.py")
    assert out[1] == str(REPO / "adapters" / "__init__.py")
    assert out[2] == "True"
    assert out[3].startswith(str(tmp_path / "venv"))  # the editable install under test, not the running one


def test_install_venvs_see_the_running_interpreters_packages(tmp_path):
    py = _venv(tmp_path / "venv")
    out = subprocess.run([str(py), "-c", "import sys, torch; print(torch.__file__); print(sys.prefix)"], check=True,
                         cwd=tmp_path, capture_output=True, text=True).stdout.split()
    import torch

    assert out == [torch.__file__, str(tmp_path / "venv")]
