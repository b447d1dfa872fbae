import pytest

from gram_plugin.paths import UnsafePathError, inside_run_dir


def test_paths_stay_inside_run_dir(tmp_path):
    assert inside_run_dir(tmp_path, "a/b.safetensors") == (tmp_path / "a" / "b.safetensors").resolve()
    for bad in ["../x", "/etc/passwd", "a/../../x"]:
        with pytest.raises(UnsafePathError):
            inside_run_dir(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(UnsafePathError, match="leaves"):
        inside_run_dir(tmp_path, "link/x")
