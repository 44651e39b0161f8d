"""Run directories anywhere: a local path, or a filesystem URI (``s3://bucket/prefix/run``, ``gs://…``,
``file:///…``) read and written through ``pyarrow.fs`` (docs/SCALE.md, remote storage).

Every stage computes on LOCAL files (the gradient and embedding stores are memory-mapped). For a remote
run, :func:`staged` keeps a local copy in a cache folder (``$DVEMB_CACHE``, default
``~/.cache/dvemb/runs``; one sub-folder per URI) and syncs it with the store, driven by ``manifest.json``
(size + sha256 of every finalised file, :mod:`dvemb.store.integrity`):

* :func:`pull` downloads every file the remote manifest lists that is missing or different in the copy,
  checks its sha256 before it replaces the local file, and drops local files the remote no longer lists.
* :func:`push` uploads every finalised file that changed in the copy since the pull, then ``manifest.json``
  LAST, then deletes the objects of files the copy dropped (``dvemb gc``, a redone stage) — only under the
  run's prefix.

What is atomic: a local file (temporary name + ``os.replace``); an object store object (it becomes
visible when its upload completes; the size of every uploaded object is checked). What is NOT: a run as a
whole — an object store has no multi-file transaction. The manifest is written last, so an object the
remote ``manifest.json`` does not list, or lists with another size or sha256, is not part of the run:
``dvemb status URI`` names it and :func:`pull` refuses it. A failed upload can leave such an object under
its name (pyarrow completes a multipart upload when its stream is closed, even after an error); it is
deleted when possible and never listed.

Plain paths and ``file://`` URIs pass through untouched (no copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from dvemb.errors import DamagedFileError, DvembError, RunPathError, StoreError
from dvemb.store import integrity

log = logging.getLogger(__name__)
CHUNK = 8 << 20  # bytes per read / write while streaming a file
CACHE_ENV = "DVEMB_CACHE"
_RUN_MARKER = integrity.RUN_MARKER
_MANIFEST = integrity.MANIFEST


class RemoteError(StoreError):
    """A remote store cannot be reached or answers with an error (no such bucket, no credentials, ...)."""


def is_remote(target: str | os.PathLike[str]) -> bool:
    """True for a filesystem URI other than ``file://`` (``s3://``, ``gs://``, ``hdfs://``, ...)."""
    scheme = urlsplit(str(target)).scheme if "://" in str(target) else ""
    return bool(scheme) and scheme != "file"


def local_path(target: str | os.PathLike[str]) -> Path:
    """A plain path, or the path of a ``file://`` URI."""
    s = str(target)
    return Path(unquote(urlsplit(s).path)) if s.startswith("file://") else Path(s)


def cache_root() -> Path:
    """Where remote runs are staged: ``$DVEMB_CACHE`` or ``~/.cache/dvemb/runs``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dvemb" / "runs").expanduser().resolve()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _safe_rel(rel: str, where: str) -> str:
    """A manifest key that stays inside the run (no absolute path, no ``..``)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or rel != p.as_posix():
        raise DamagedFileError(f"{where}: lists {rel!r}, a path outside the run; refusing it")
    return rel


@dataclass(frozen=True)
class Remote:
    """One remote run: ``fs`` and ``base`` (``bucket/prefix/run``); ``uri`` names it in every message."""

    uri: str
    fs: pafs.FileSystem
    base: str

    @classmethod
    def open(cls, uri: str) -> Remote:
        """Parse ``uri`` (pyarrow: the endpoint from ``AWS_ENDPOINT_URL`` or ``?endpoint_override=``)."""
        try:
            fs, base = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise RemoteError(f"{uri}: not a usable filesystem URI ({_first_line(e)})") from None
        base = base.rstrip("/")
        if "/" not in base:  # s3://bucket: --force would empty the whole bucket
            raise RunPathError(f"{uri}: a run needs a prefix inside the bucket, e.g. {uri.rstrip('/')}/runs/NAME")
        return cls(uri.split("?", 1)[0].rstrip("/"), fs, base)

    def key(self, rel: str) -> str:
        """The store path of the run's file ``rel``."""
        return f"{self.base}/{rel}"

    def name(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    @contextmanager
    def _io(self, rel: str = "", doing: str = "") -> Iterator[None]:
        """pyarrow's errors (unreachable endpoint, no bucket, no credentials) as RemoteError naming the URI."""
        try:
            yield
        except (pa.ArrowException, OSError) as e:
            raise RemoteError(f"{self.name(rel)}: {doing + ' failed: ' if doing else ''}{_first_line(e)}") from None

    def check_bucket(self) -> None:
        """RemoteError naming the bucket when it does not exist (or these credentials cannot see it)."""
        bucket = self.base.split("/", 1)[0]
        with self._io(doing="looking up the bucket"):
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        if not found:
            raise RemoteError(f"{self.uri}: bucket {bucket!r} does not exist (or these credentials cannot see it)")

    def listing(self) -> dict[str, int]:
        """``{relative path: size in bytes}`` of every object under the run's prefix ({} when none)."""
        with self._io(doing="listing"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        n = len(self.base) + 1
        return {i.path[n:]: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, rel: str) -> bytes | None:
        """An object's bytes (None when there is none)."""
        with self._io(rel, "reading"):
            if self.fs.get_file_info(self.key(rel)).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read()

    def manifest(self) -> dict[str, dict] | None:
        """The remote ``manifest.json`` files (None without one); DamagedFileError when unreadable."""
        data = self.read(_MANIFEST)
        if data is None:
            self.check_bucket()
            return None
        try:
            files = json.loads(data)["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedFileError(f"{self.name(_MANIFEST)}: damaged manifest ({type(e).__name__}: {e})") from None
        return {_safe_rel(rel, self.name(_MANIFEST)): e for rel, e in files.items()}

    def write_manifest(self, files: dict[str, dict]) -> None:
        body = json.dumps({"schema_version": integrity.SCHEMA_VERSION, "files": files}, indent=1, sort_keys=True)
        self._put_bytes(_MANIFEST, body.encode())

    def _put_bytes(self, rel: str, data: bytes) -> None:
        with self._io(rel, "writing"), self.fs.open_output_stream(self.key(rel)) as f:
            f.write(data)

    def upload(self, local: Path, rel: str, entry: dict) -> None:
        """Upload ``local`` as ``rel``; its sha256 and size must be ``entry``'s (else nothing stays listed)."""
        key, h = self.key(rel), hashlib.sha256()
        try:
            with self._io(rel, "upload"), open(local, "rb") as src, self.fs.open_output_stream(key) as dst:
                while block := src.read(CHUNK):
                    h.update(block)
                    dst.write(block)
            if h.hexdigest() != entry["sha256"]:
                raise DamagedFileError(f"{local}: content differs from its sha256 in manifest.json; not uploaded")
            with self._io(rel, "upload check"):
                size = self.fs.get_file_info(key).size
            if size != entry["size"]:
                raise RemoteError(f"{self.name(rel)}: uploaded {size} bytes, expected {entry['size']}")
        except BaseException:
            self.delete(rel, quiet=True)  # a closed stream completes even a failed multipart upload
            raise

    def download(self, rel: str, target: Path, entry: dict) -> None:
        """Download ``rel`` onto ``target`` (temporary file + ``os.replace``) after checking its sha256."""
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        target.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        try:
            with self._io(rel, "download"), self.fs.open_input_stream(self.key(rel)) as src, open(tmp, "wb") as f:
                while block := src.read(CHUNK):
                    h.update(block)
                    size += len(block)
                    f.write(block)
            if (size, h.hexdigest()) != (entry["size"], entry["sha256"]):
                raise DamagedFileError(
                    f"{self.name(rel)}: damaged — {size} bytes, sha256 {h.hexdigest()[:12]}…; manifest.json says "
                    f"{entry['size']} bytes, sha256 {entry['sha256'][:12]}…"
                )
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, rel: str, quiet: bool = False) -> None:
        try:
            with self._io(rel, "delete"):
                self.fs.delete_file(self.key(rel))
        except RemoteError:
            if not quiet:
                raise

    def delete_run(self) -> None:
        """Delete every object under the prefix — only a prefix holding ``run.json`` (a dvemb run)."""
        if _RUN_MARKER not in self.listing():
            raise RunPathError(f"{self.uri}: holds no run.json; dvemb never deletes it")
        with self._io(doing="deleting the run"):
            self.fs.delete_dir_contents(self.base)

    def verify(self, deep: bool = True) -> dict[str, str]:
        """``{URI of a file: why}`` for every file the remote manifest lists that is missing, has another
        size, or (``deep``) another sha256; the remote objects are read, nothing is written."""
        files = self.manifest()
        if files is None:
            raise StoreError(f"{self.name(_MANIFEST)}: missing — not a dvemb run, or none was pushed there")
        sizes, bad = self.listing(), {}
        for rel, e in sorted(files.items()):
            if rel not in sizes:
                bad[self.name(rel)] = "missing (listed in manifest.json)"
            elif sizes[rel] != e["size"]:
                bad[self.name(rel)] = f"size {sizes[rel]} bytes, manifest.json says {e['size']}"
            elif deep:
                h = hashlib.sha256()
                with self._io(rel, "reading"), self.fs.open_input_stream(self.key(rel)) as f:
                    while block := f.read(CHUNK):
                        h.update(block)
                if h.hexdigest() != e["sha256"]:
                    bad[self.name(rel)] = "content differs from its sha256 in manifest.json"
        return bad

    def unlisted(self) -> list[str]:
        """Objects under the prefix that the manifest does not list (an unfinished push or stage)."""
        files = self.manifest() or {}
        return sorted(rel for rel in self.listing() if rel != _MANIFEST and rel not in files)

    def modified(self, rel: str) -> datetime | None:
        with self._io(rel, "reading"):
            info = self.fs.get_file_info(self.key(rel))
        return info.mtime if info.type == pafs.FileType.File else None


def staging_dir(uri: str) -> Path:
    """The local copy of the remote run ``uri``: ``<cache>/<sha256(uri)[:16]>/<last name of the URI>``."""
    r = uri.split("?", 1)[0].rstrip("/")
    return cache_root() / hashlib.sha256(r.encode()).hexdigest()[:16] / (r.rsplit("/", 1)[-1] or "run")


def _local_manifest(root: Path) -> dict[str, dict]:
    """The staged copy's manifest; a damaged one (the copy is the cache's own) is dropped: all is pulled again."""
    try:
        return integrity.read_manifest(root) if root.is_dir() else {}
    except DamagedFileError:
        (root / _MANIFEST).unlink()
        return {}


def pull(remote: Remote, root: Path, prune: bool = True) -> dict[str, int]:
    """Make ``root`` hold every file of the remote run (sha256-checked); ``prune``: drop local files the
    remote manifest no longer lists. Returns ``{"files": downloaded, "bytes": downloaded bytes}``."""
    files = remote.manifest()
    if files is None or _RUN_MARKER not in files:
        raise StoreError(f"{remote.uri}: no run.json — not a dvemb run directory (no manifest.json there lists one)")
    root.mkdir(parents=True, exist_ok=True)
    have = _local_manifest(root)
    got = {}
    for rel, e in sorted(files.items(), key=lambda kv: kv[0] == _RUN_MARKER):  # run.json last
        p = root / rel
        if have.get(rel) == e and p.is_file() and p.stat().st_size == e["size"]:
            continue
        remote.download(rel, p, e)
        got[rel] = e
    gone = {rel: None for rel in have if rel not in files} if prune else {}
    for rel in gone:
        (root / rel).unlink(missing_ok=True)
    if got or gone:
        integrity._update(root, {**got, **gone})
    return {"files": len(got), "bytes": sum(e["size"] for e in got.values())}


def push(remote: Remote, root: Path, base: dict[str, dict]) -> dict[str, dict]:
    """Upload the finalised files of ``root`` that differ from ``base`` (the copy's manifest when it was
    pulled), merge them into the remote ``manifest.json`` (written last), then delete the objects of files
    dropped since ``base``. Returns the uploaded manifest entries."""
    now = _local_manifest(root)
    changed = {rel: e for rel, e in now.items() if base.get(rel) != e}
    gone = [rel for rel in base if rel not in now]
    for rel, e in sorted(changed.items(), key=lambda kv: kv[0] == _RUN_MARKER):  # run.json last
        remote.upload(root / rel, rel, e)
    if changed or gone:
        commit_entries(remote, changed, gone)
    return changed


def commit_entries(remote: Remote, entries: dict[str, dict], gone: list[str] = ()) -> None:
    """Merge uploaded files' ``entries`` into the remote manifest (read now, so entries other writers
    committed meanwhile stay), write it, then delete the objects of the ``gone`` files."""
    files = remote.manifest() or {}
    files.update(entries)
    for rel in gone:
        files.pop(rel, None)
    remote.write_manifest(files)
    for rel in gone:
        remote.delete(rel, quiet=True)


def _prepare_new(remote: Remote, force: bool, resume: bool, force_name: str) -> bool:
    """The overwrite rule of a new run at ``remote`` (as for a local run directory). Returns True when a
    run is there to continue (``resume``)."""
    remote.check_bucket()
    objects = remote.listing()
    if not objects:
        return False
    if _RUN_MARKER not in objects:
        raise RunPathError(
            f"{remote.uri}: holds {len(objects)} object(s) but no run.json — not a dvemb run; dvemb never "
            "deletes it — choose another --out"
        )
    if resume:
        return True
    never_trained = not any(rel.startswith(("checkpoints/", "grads/")) for rel in objects)
    if not (force or never_trained):
        from dvemb.store.rundir import RunExistsError

        raise RunExistsError(
            f"out {remote.uri!r}: holds a run (run.json); set {force_name} to overwrite it or choose another out"
        )
    remote.delete_run()
    return False


def prepare(target: str | os.PathLike[str], force: bool, resume: bool = False, force_name: str = "--force") -> None:
    """Before a new run is trained into a remote ``target``: refuse one holding a run unless ``force``
    (then delete its prefix). No-op for a local path (RunDir.create applies the same rule)."""
    if is_remote(target):
        _prepare_new(Remote.open(str(target)), force, resume, force_name)


@contextmanager
def staged(
    target: str | os.PathLike[str],
    *,
    new: bool = False,
    force: bool = False,
    resume: bool = False,
    force_name: str = "--force",
    read_only: bool = False,
    prune: bool = True,
) -> Iterator[Path]:
    """Yield a local run directory for ``target``: the path itself when local; else a staged copy, pulled
    first and pushed when the block ends (also after an error: its finalised files, e.g. run.json with the
    failure or a Ctrl-C, so that ``--resume`` works from anywhere; a second Ctrl-C stops that upload, and
    what it had not written into manifest.json is not part of the run).

    new: a run is created there (:func:`prepare`'s overwrite rule; the copy starts empty unless
    ``resume``). read_only: nothing is pushed (a reader; or a parallel task, which uploads its own files
    with :func:`upload` and leaves the manifest to one writer, :func:`commit`). prune=False: keep local
    files the remote does not list (yet: a parallel task's sibling outputs)."""
    if not is_remote(target):
        yield local_path(target)
        return
    remote = Remote.open(str(target))
    root = staging_dir(str(target))
    if new and not _prepare_new(remote, force, resume, force_name):
        if root.exists() and not resume:
            shutil.rmtree(root)  # a stale copy (inside the cache folder) of an earlier run there
        root.mkdir(parents=True, exist_ok=True)
        base = {}  # nothing is there yet: every finalised file is pushed
    else:
        pull(remote, root, prune=prune)
        base = _local_manifest(root)
    try:
        yield root
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, DvembError) and len(e.args) == 1 and isinstance(e.args[0], str):
            e.args = (e.args[0].replace(str(root), remote.uri),)  # name the run as the user gave it
        if not read_only:
            if isinstance(e, KeyboardInterrupt):
                log.warning("interrupted: uploading the finished files of %s (Ctrl-C again to skip)", remote.uri)
            with suppress(Exception):  # the stage's own error is the one to report
                push(remote, root, base)
        raise
    if not read_only:
        push(remote, root, base)


def entries(root: Path, paths: list[str | os.PathLike[str]]) -> dict[str, dict]:
    """The local manifest entries of ``paths`` (files of the run at ``root``), keyed by relative path."""
    files = _local_manifest(root)
    rels = [Path(p).resolve().relative_to(root.resolve()).as_posix() for p in paths]
    return {rel: files[rel] for rel in rels if rel in files}


def upload(target: str | os.PathLike[str], root: Path, files: dict[str, dict]) -> None:
    """Upload ``files`` (relative path -> manifest entry) of the staged copy ``root`` to the remote run,
    without touching its manifest.json (:func:`commit` records them); no-op for a local run directory."""
    if is_remote(target):
        store = Remote.open(str(target))
        for rel, e in files.items():
            store.upload(root / rel, rel, e)


def commit(target: str | os.PathLike[str], files: dict[str, dict]) -> None:
    """Record uploaded ``files`` (relative path -> manifest entry) in the remote run's manifest.json; no-op for
    a local run directory (its manifest was updated as each file was written)."""
    if is_remote(target) and files:
        commit_entries(Remote.open(str(target)), files)
