"""Atomic writes: a reader sees the old content or the new one, never a half-written file, and a
write that fails (exception, full disk) leaves the old content in place and no temporary behind.

Everything is written under a temporary name in the target's own folder (os.replace is atomic only
within one file system), made durable with fsync, and then renamed over the target.

- atomic_path(path): for writers that want a path (safetensors.save_file, torch.save, save_pretrained).
- atomic_open(path) / write_text_atomic / write_json_atomic: for writers that want a file object.
- staged_folder(folder): several files written in a staging folder, moved into ``folder`` once all
  were written (each move is atomic; the set of moves is not, but it only starts after every write
  succeeded).
- atomic_folder(path): a whole new folder that replaces ``path``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["atomic_folder", "atomic_open", "atomic_path", "fsync_file", "staged_folder", "write_json_atomic",
           "write_text_atomic"]


def _temp_name(path: str) -> str:
    # hidden, in the same folder, unique per process and call (two writers never share a temporary)
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk, so that a rename after it cannot expose an empty file after a crash."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; write the file there. On normal exit the file is
    fsynced and renamed over ``path``; on an exception it is removed and ``path`` is left as it was."""
    tmp = _temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """``open(path, mode)`` that replaces ``path`` atomically when the block ends without an exception.

    mode is "w" (text) or "wb" (binary). The file is created with mode "x" so it gets the same
    permissions as a plain open(path, "w") would (tempfile.mkstemp would make it private, 0600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding) as fh:
            yield fh


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str, obj: Any, trailing_newline: bool = False, **dumps_kwargs: Any) -> None:
    """json.dumps(obj, **dumps_kwargs) written atomically to ``path``."""
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + ("\n" if trailing_newline else ""))


@contextmanager
def staged_folder(folder: str) -> Iterator[str]:
    """Yield an empty staging folder (hidden, inside ``folder``) to write files into. On normal exit
    every file under it is fsynced and then moved to the same relative path under ``folder``,
    replacing what was there; files of ``folder`` that were not written stay. The staging folder is
    removed in every case, so a failed write leaves ``folder`` exactly as it was."""
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fastpeft-stage-", dir=folder)
    try:
        yield staging
        staged = []
        for root, _, files in os.walk(staging):
            for name in sorted(files):
                src = os.path.join(root, name)
                staged.append((src, os.path.join(folder, os.path.relpath(src, staging))))
        for src, _ in staged:  # all durable before the first one becomes visible
            fsync_file(src)
        for src, dst in staged:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_folder(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temporary folder next to ``path`` to fill; on normal exit it becomes ``path``.

    If ``path`` exists, FileExistsError unless ``overwrite``: then the old folder is moved aside, the
    new one moved in and the old one deleted (a non-empty folder cannot be renamed over, so there is
    a moment between the two renames where ``path`` does not exist). On an exception the temporary
    folder is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        if not os.path.exists(path):
            os.replace(tmp, path)
            return
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "folder already exists", path)
        old = _temp_name(path)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the old folder back
            raise
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise
