"""Atomic file and folder writes.

Every file fv_serving produces (checkpoints, vectors, ONNX graphs, JSON, Triton
version folders) is first written next to its destination and then renamed into
place, so a crash or a refused input never leaves a half-written file behind and a
reader (Triton included) sees either the old content or the new one. The data is
fsynced before the rename and the folder after it, so what a switch reports as done
survives a power cut too (a rename alone can be reordered before the data).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def default_mode(base: int) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it over the destination on success."""
    dest = Path(destination)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp (and some writers) make 0600 files; a served model must be readable like any other file.
        tmp.chmod(default_mode(0o666))
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(destination: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


def write_json_atomic(destination: str | os.PathLike[str], obj: Any) -> Path:
    return write_bytes_atomic(destination, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside the destination; rename it into place on success.

    The destination must not exist yet: a Triton version folder, once published, is
    never rewritten (a new version gets a new number).
    """
    dest = Path(destination)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.chmod(default_mode(0o777))
    try:
        yield tmp
        fsync_path(tmp)
        os.rename(tmp, dest)
        fsync_path(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
