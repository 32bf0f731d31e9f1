"""fastpeft.utils.atomic: a failed write leaves the old content and no temporary behind."""
from __future__ import annotations

import json
import os

import pytest

from fastpeft.utils.atomic import atomic_folder, atomic_open, atomic_path, staged_folder, write_json_atomic


def test_atomic_open_replaces_or_keeps(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_open(str(target), "wb") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.txt"]


def test_new_file_gets_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain").write_text("x")
    write_json_atomic(str(tmp_path / "atomic.json"), {"a": 1}, trailing_newline=True, indent=2)
    assert json.loads((tmp_path / "atomic.json").read_text()) == {"a": 1}
    assert (tmp_path / "atomic.json").read_text().endswith("}\n")
    assert (tmp_path / "atomic.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    target = tmp_path / "w.bin"
    with atomic_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"data")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["w.bin"]


def test_staged_folder_moves_all_files_or_none(tmp_path):
    (tmp_path / "keep.txt").write_text("untouched")
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(OSError):
        with staged_folder(str(tmp_path)) as stage:
            with open(os.path.join(stage, "a.txt"), "w") as fh:
                fh.write("new a")
            raise OSError("disk full")
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "keep.txt"]

    with staged_folder(str(tmp_path)) as stage:
        os.makedirs(os.path.join(stage, "sub"))
        with open(os.path.join(stage, "a.txt"), "w") as fh:
            fh.write("new a")
        with open(os.path.join(stage, "sub", "b.txt"), "w") as fh:
            fh.write("b")
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "sub" / "b.txt").read_text() == "b"
    assert (tmp_path / "keep.txt").read_text() == "untouched"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "keep.txt", "sub"]


def _touch(folder, name):
    with open(os.path.join(folder, name), "w"):
        pass


def test_atomic_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_folder(str(out)) as tmp:
        _touch(tmp, "one")
    assert os.listdir(out) == ["one"]

    with pytest.raises(FileExistsError) as info:
        with atomic_folder(str(out)) as tmp:
            _touch(tmp, "two")
    assert info.value.filename == str(out)
    assert os.listdir(out) == ["one"] and os.listdir(tmp_path) == ["out"]

    with pytest.raises(ValueError):
        with atomic_folder(str(out), overwrite=True):
            raise ValueError("failed while writing")
    assert os.listdir(out) == ["one"] and os.listdir(tmp_path) == ["out"]

    with atomic_folder(str(out), overwrite=True) as tmp:
        _touch(tmp, "two")
    assert os.listdir(out) == ["two"] and os.listdir(tmp_path) == ["out"]

    # the new folder cannot be moved in after the old one was moved aside: the old one goes back
    real_replace = os.replace

    def fail_on_new(src, dst):
        if os.path.basename(src).startswith(".out.tmp-"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_new)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(str(out), overwrite=True) as tmp:
            _touch(tmp, "three")
    assert os.listdir(out) == ["two"] and os.listdir(tmp_path) == ["out"]
