"""sr_tf.io.files: a file is published whole or not at all."""

import json
import os
import time

import pytest

from sr_tf.io import files


def test_atomic_open_publishes_on_success_and_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "report.json"
    files.write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with files.atomic_open(target, "w", encoding="utf-8") as f:
            f.write('{"half": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}  # untouched
    assert os.listdir(target.parent) == ["report.json"]  # no temporary left
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_open(target, "a"):
            pass


def test_atomic_path_keeps_the_extension_for_writers_that_need_it(tmp_path):
    target = tmp_path / "model.keras"
    with files.atomic_path(target) as temporary:
        assert temporary.endswith(".keras") and os.path.dirname(temporary) == str(tmp_path)
        assert not target.exists()
        with open(temporary, "wb") as f:
            f.write(b"weights")
    assert target.read_bytes() == b"weights" and os.listdir(tmp_path) == ["model.keras"]
    with pytest.raises(OSError):
        with files.atomic_path(target) as temporary:
            with open(temporary, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"weights" and os.listdir(tmp_path) == ["model.keras"]


def test_what_a_killed_write_left_is_removed_by_the_next_one_when_old(tmp_path):
    target = tmp_path / "out.png"
    old = tmp_path / ".out.png.0123abcd.tmp"
    old_with_extension = tmp_path / ".out.png.89abcdef.tmp.png"
    recent = tmp_path / ".out.png.fedcba98.tmp"  # perhaps another process writing right now
    other = tmp_path / ".other.png.0123abcd.tmp"
    for path in (old, old_with_extension, recent, other):
        path.write_bytes(b"partial")
    past = time.time() - 3600
    for path in (old, old_with_extension, other):
        os.utime(path, (past, past))
    files.write_bytes_atomic(target, b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.png", recent.name, other.name])


def test_checksum(tmp_path):
    path = tmp_path / "shard"
    path.write_bytes(b"abc")
    assert files.file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
