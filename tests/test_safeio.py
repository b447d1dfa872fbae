"""The safe-I/O layer: checked tensor files, kinds, atomic writes, run-folder locks."""

import json
import os
import struct

import pytest
import torch

from gram_plugin.safeio import (
    ArtefactError,
    CacheError,
    CheckpointError,
    RunFolderError,
    atomic_write_text,
    load_tensors,
    locked_dir,
    save_tensors,
)


def _payload_offset(path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def test_round_trip_keeps_tensors_metadata_and_kind(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64),
         "h": torch.ones(3, dtype=torch.bfloat16)}
    save_tensors(tmp_path / "f.safetensors", t, {"x": 1}, kind="feature-cache")
    back, meta = load_tensors(tmp_path / "f.safetensors", kind="feature-cache")
    assert meta == {"kind": "feature-cache", "x": 1}
    for k in t:
        assert torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype


def test_a_flipped_payload_byte_is_named_as_damage(tmp_path):
    path = tmp_path / "c.safetensors"
    save_tensors(path, {"w": torch.zeros(4, 4), "v": torch.ones(2)}, {}, kind="meta-checkpoint")
    raw = bytearray(path.read_bytes())
    raw[_payload_offset(path) + 5] ^= 0x40  # inside "v" or "w": a silently different number without a checksum
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"checkpoint .*c.safetensors is damaged: checksum mismatch in \['[vw]'\]"):
        load_tensors(path, what="checkpoint", error=CheckpointError)


def test_the_error_names_what_failed_and_what_the_file_is(tmp_path):
    save_tensors(tmp_path / "cache.safetensors", {"features": torch.zeros(2, 2)}, {}, kind="feature-cache")
    with pytest.raises(CheckpointError, match="is a feature cache file, not a checkpoint"):
        load_tensors(tmp_path / "cache.safetensors", what="checkpoint", error=CheckpointError, kind="meta-checkpoint")
    with pytest.raises(CacheError, match="is a folder, not a file"):
        load_tensors(tmp_path, what="feature cache", error=CacheError)
    with pytest.raises(ArtefactError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    # a metadata document that is JSON but not an object
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "list.safetensors"), metadata={"gram_plugin": json.dumps([1, 2])})
    with pytest.raises(ArtefactError, match="metadata must be a JSON object, got list"):
        load_tensors(tmp_path / "list.safetensors")


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_locked_folder_refuses_a_second_holder_until_released(tmp_path):
    with locked_dir(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use by another run"):
            with locked_dir(tmp_path / "run"):
                pass
    with locked_dir(tmp_path / "run"):  # released: usable again
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        with locked_dir(tmp_path / "file"):
            pass


CORRUPT_TABLE = """
import sys
from safetensors import safe_open
from safetensors.torch import save_file
import torch
from gram_plugin.safeio import CHECKSUM_KEY, ArtefactError, load_tensors, save_tensors

path, table = sys.argv[1], sys.argv[2]
save_tensors(path, {"a": torch.ones(2)}, {"x": 1}, kind="feature-cache")
with safe_open(path, "pt") as f:
    header = dict(f.metadata())
header[CHECKSUM_KEY] = table  # a checksum table that is valid JSON but no mapping, or no JSON at all
save_file({"a": torch.ones(2)}, path, metadata=header)
try:
    load_tensors(path, "feature cache")
except ArtefactError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("table", ["[1, 2]", '"text"', "{not json"])
@pytest.mark.parametrize("optimize", [[], ["-O"]])
def test_a_corrupt_checksum_table_is_the_same_artefact_error_under_python_O(tmp_path, table, optimize):
    import subprocess
    import sys

    path = tmp_path / "f.safetensors"
    out = subprocess.run([sys.executable, *optimize, "-c", CORRUPT_TABLE, str(path), table], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == f"ArtefactError feature cache {path} has a corrupt checksum table", out
