"""HuggingFace ``datasets`` as a data source (``data.source: hf``): local files only, never the hub.

A path is one of:
    * a directory written by ``Dataset.save_to_disk`` (one table) or ``DatasetDict.save_to_disk``
      (its ``train`` / ``validation`` (or ``val``) / ``test`` splits);
    * a Parquet file, or a directory of Parquet files (read with ``load_dataset("parquet", data_files=...)``);
    * an Arrow file (``Dataset.from_file``).

The rows must follow the table contract of :mod:`dvemb.data.tables` (``sample_id`` + ``x``/``label`` or
``tokens``); every table is validated with the path named in errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa

from dvemb.data.tables import validate_table
from dvemb.errors import TableValidationError

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _as_table(ds) -> pa.Table:
    """A ``datasets.Dataset`` (any indices mapping applied) as an in-memory Arrow table."""
    return ds.with_format("arrow")[:]


def load_hf(path: str | os.PathLike[str]) -> dict[str, pa.Table]:
    """The validated tables at ``path``: ``{"train": table}`` for one dataset, else one per split found."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise TableValidationError(f"{p}: no such dataset file or directory")
    try:
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(p), keep_in_memory=True)
            raw = {SPLIT_NAMES[k]: _as_table(v) for k, v in dd.items() if k in SPLIT_NAMES}
            if "train" not in raw:
                raise TableValidationError(f"{p}: the saved DatasetDict has no 'train' split (splits: {list(dd)})")
        elif p.is_dir() and (p / "state.json").is_file():
            raw = {"train": _as_table(datasets.load_from_disk(str(p), keep_in_memory=True))}
        elif p.suffix == ".arrow":
            raw = {"train": _as_table(datasets.Dataset.from_file(str(p), in_memory=True))}
        else:
            files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]
            if not files:
                raise TableValidationError(f"{p}: neither a saved dataset nor Parquet files")
            with tempfile.TemporaryDirectory(prefix="dvemb-hf-") as cache:  # leave no cache behind
                ds = datasets.load_dataset(
                    "parquet", data_files=files, split="train", cache_dir=cache, keep_in_memory=True
                )
                raw = {"train": _as_table(ds)}
    except TableValidationError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, named
        raise TableValidationError(f"{p}: not a readable HuggingFace dataset ({type(e).__name__}: {e})") from None
    return {split: validate_table(t, f"{p} [{split}]" if len(raw) > 1 else str(p)) for split, t in raw.items()}
