"""Run-directory integrity: ``manifest.json`` (sha256 + size of every finalised file) and file checks.

Every file finalised through :mod:`dvemb.store.atomic` inside a run directory (a folder holding
``run.json``, up to three levels above the file) is recorded in ``RUN/manifest.json``::

    {"schema_version": 1, "files": {"grads/seg-0000-rank-0.arrow": {"size": 123, "sha256": "…"}, …}}

The manifest is rewritten atomically under an exclusive ``flock`` on the run folder, so stages
writing from several threads or processes (parallel segments) never lose an entry.

:func:`check_file` says why a file is damaged: unreadable structure (JSON that does not parse, a
Parquet / Arrow IPC file without its footer, a safetensors header that does not cover the file),
a size other than the manifest's (cheap; every stage checks its inputs this way), or — ``deep`` —
a sha256 other than the manifest's (``dvemb status``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dvemb.errors import DamagedFileError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
RUN_MARKER = "run.json"
_DEPTH = 3  # RUN/run.json, RUN/grads/x, RUN/eval/sub/x
CHECKED_SUFFIXES = (".json", ".parquet", ".arrow", ".safetensors")


def run_root_of(path: str | os.PathLike[str]) -> Path | None:
    """The run directory holding ``path`` (nearest ancestor with ``run.json``, <= 3 levels up), or None."""
    folder = Path(path).absolute().parent
    for _ in range(_DEPTH):
        if (folder / RUN_MARKER).is_file():
            return folder
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive flock on the run folder itself (no lock file is left in the run)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_manifest(root: str | os.PathLike[str]) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of the run at ``root`` ({} without a manifest)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedFileError(
            f"{path}: damaged manifest ({type(e).__name__}: {e}); delete it to start a fresh one"
        ) from None


def _write_manifest(root: Path, files: dict[str, dict]) -> None:
    target = root / MANIFEST
    tmp = target.with_name(f".{MANIFEST}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "files": files}, indent=1, sort_keys=True))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _update(root: Path, changes: dict[str, dict | None]) -> None:
    with _locked(root):
        files = read_manifest(root)
        for rel, entry in changes.items():
            if entry is None:
                files.pop(rel, None)
            else:
                files[rel] = entry
        _write_manifest(root, files)


def record(path: str | os.PathLike[str]) -> None:
    """Record a just-finalised file's size and sha256 in its run's manifest (no-op outside a run)."""
    path = Path(path).absolute()
    root = run_root_of(path)
    if root is None or path.name == MANIFEST:
        return
    size, sha = file_digest(path)
    _update(root, {path.relative_to(root).as_posix(): {"size": size, "sha256": sha}})


def forget(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Drop entries of files deleted on purpose (e.g. a stage's outputs being redone)."""
    by_root: dict[Path, dict[str, None]] = {}
    for p in paths:
        p = Path(p).absolute()
        root = run_root_of(p)
        if root is not None:
            by_root.setdefault(root, {})[p.relative_to(root).as_posix()] = None
    for root, changes in by_root.items():
        if (root / MANIFEST).exists():
            _update(root, changes)


def _structure(path: Path) -> str | None:
    """Why ``path`` is unreadable by its format (None if it reads), checking headers/footers only."""
    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(path).metadata  # noqa: B018 - reads and checks the footer
        elif suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(path), "r") as source:
                pa.ipc.open_file(source).num_record_batches  # noqa: B018 - reads and checks the footer
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
    except Exception as e:  # noqa: BLE001 - every reader failure means the same: unreadable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"unreadable {suffix[1:]} file ({msg})"
    return None


def check_file(path: str | os.PathLike[str], entry: dict | None = None, deep: bool = False) -> str | None:
    """Why ``path`` is damaged, or None. entry: its manifest entry (size, sha256); deep: compare sha256."""
    path = Path(path)
    if not path.is_file():
        return "missing" + (" (listed in manifest.json)" if entry else "")
    if entry is not None and path.stat().st_size != entry["size"]:
        return f"size {path.stat().st_size} bytes, manifest.json says {entry['size']} (truncated or overwritten)"
    if deep and entry is not None and file_digest(path)[1] != entry["sha256"]:
        return "content differs from its sha256 in manifest.json"
    return _structure(path)


def damaged(root: str | os.PathLike[str], paths: Iterable[Path], deep: bool = False) -> dict[Path, str]:
    """``{path: reason}`` for each of ``paths`` (inside run ``root``) that is damaged."""
    root = Path(root)
    out: dict[Path, str] = {}
    try:
        files = read_manifest(root)
    except DamagedFileError as e:  # sizes and checksums unknown: check the formats only
        files, out[root / MANIFEST] = {}, str(e).split(": ", 1)[1]
    for p in paths:
        rel = Path(p).absolute().relative_to(root.absolute()).as_posix()
        reason = check_file(p, files.get(rel), deep)
        if reason:
            out[Path(p)] = reason
    return out


def check_files(root: str | os.PathLike[str], paths: Iterable[Path], deep: bool = False) -> None:
    """Raise DamagedFileError naming every damaged file of ``paths`` (run ``root``) and why."""
    bad = damaged(root, paths, deep)
    if bad:
        raise DamagedFileError("; ".join(f"{p}: damaged — {why}" for p, why in bad.items()))


def run_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every file of the run that can be checked: manifest entries and all non-hidden data files."""
    root = Path(root)
    found = {p for p in root.rglob("*") if p.is_file() and p.suffix in CHECKED_SUFFIXES and not p.name.startswith(".")}
    with suppress(DamagedFileError):  # a damaged manifest is reported by damaged()
        found |= {root / rel for rel in read_manifest(root)}
    found.discard(root / MANIFEST)
    return sorted(found)


def temp_leftovers(root: str | os.PathLike[str]) -> list[Path]:
    """Hidden temporary files (``.NAME.tmp-…``) a killed writer left behind."""
    return sorted(p for p in Path(root).rglob(".*.tmp-*") if p.is_file())
