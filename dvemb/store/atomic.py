"""Atomic file writes: write to a temporary sibling, then ``os.replace`` onto the target.

A crash or exception mid-write never leaves a partial file under the target name,
and the temporary file is removed on failure. A file finalised inside a run directory is
recorded (size, sha256) in the run's ``manifest.json`` (:mod:`dvemb.store.integrity`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dvemb.store import integrity


def temp_path_for(path: Path) -> Path:
    """A fresh hidden temporary file name in ``path``'s folder (the folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def finalize(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move a finished temporary file onto ``target`` and record it in its run's manifest."""
    os.replace(tmp, target)
    integrity.record(target)
    return Path(target)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The parent directory is created. On any exception the temporary file is deleted
    and the target is left untouched.
    """
    target = Path(path)
    tmp = temp_path_for(target)
    try:
        yield tmp
        finalize(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], writer: Callable[[BinaryIO], None]) -> Path:
    """Call ``writer(fileobj)`` on a temporary file, fsync it, then rename onto ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as Parquet to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def save_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Save numeric arrays to an uncompressed ``.npz`` atomically (no object arrays)."""
    for name, a in arrays.items():
        if a.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; refusing (no pickle)")
    return write_bytes_atomic(path, lambda f: np.savez(f, **arrays))


def write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
