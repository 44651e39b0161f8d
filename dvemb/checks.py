"""Checks that stop a stage with a clear error before it trains on, or writes, something wrong.

* :func:`finite`, :func:`finite_records`, :func:`finite_frame` — no NaN/Inf reaches scores, values,
  embeddings or propagators: the first bad value is named (step, layer, sample_id, column, row) and
  nothing is written.
* :func:`check_loss_trajectory` — divergent training (a non-finite loss, or a loss 1000x above its start).
* :func:`check_tables` — the run's tables fit together before training (non-empty, same kind, same
  feature width, text no longer than the training blocks).
* :func:`check_config` — config-level checks the CLI runs before it starts an engine.
* :func:`record_segments_used`, :func:`check_segment_index` — segments against steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from dvemb.errors import DataError, NonFiniteError, StoreError, TableMismatchError, TrainingDivergedError

log = logging.getLogger(__name__)

LOSS_EXPLOSION = 1e3  # a loss this many times above max(first steps' loss, 1) means training diverged


# --- non-finite guards -----------------------------------------------------------------------
def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def finite(
    values: Any,
    what: str,
    *,
    step: int | None = None,
    layer: str | None = None,
    sample_ids: Any = None,
) -> None:
    """Raise NonFiniteError if ``values`` (tensor/array [N, ...], or a dict name -> tensor, the name
    then being the layer) holds NaN or Inf. sample_ids [N]: ids of the rows, named in the message."""
    if isinstance(values, Mapping):
        for name, v in values.items():
            finite(v, what, step=step, layer=name if layer is None else f"{layer}.{name}", sample_ids=sample_ids)
        return
    a = _as_numpy(values)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    first = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
    where = [f"step {step}"] if step is not None else []
    if layer is not None:
        where.append(f"layer {layer!r}")
    if sample_ids is not None and a.ndim:
        where.append(f"sample_id {int(_as_numpy(sample_ids)[first[0]])}")
    elif a.ndim:
        where.append(f"index {tuple(int(i) for i in first)}")
    value = a[first] if a.ndim else a
    raise NonFiniteError(
        f"{what}: non-finite value {value} at {', '.join(where) or 'a scalar'} "
        f"({int(bad.sum())} of {a.size} values); nothing was written"
    )


def finite_records(records: Iterable[Any], what: str) -> None:
    """:func:`finite` over StepGrads-like records (``step``, ``sample_ids``, ``weights``, ``grads``)."""
    for r in records:
        finite(r.grads, what, step=r.step, sample_ids=r.sample_ids)
        finite(r.weights, f"{what} (weights)", step=r.step, sample_ids=r.sample_ids)


def finite_frame(df: pl.DataFrame, what: str, columns: Iterable[str] | None = None) -> None:
    """Raise NonFiniteError naming the column, row and (when present) step / sample_id / checkpoint
    of the first NaN/Inf among the float ``columns`` of ``df`` (default: every float column)."""
    cols = list(columns) if columns is not None else [c for c, t in df.schema.items() if t.is_float()]
    for c in cols:
        bad = ~np.isfinite(df[c].to_numpy())
        if bad.any():
            row = int(np.argmax(bad))
            keys = [f"{k} {df[k][row]}" for k in ("step", "sample_id", "checkpoint") if k in df.columns]
            raise NonFiniteError(
                f"{what}: column {c!r} is {df[c][row]} at row {row}"
                + (f" ({', '.join(keys)})" if keys else "")
                + f"; {int(bad.sum())} of {df.height} rows non-finite; nothing was written"
            )


def diverged_at(loss: np.ndarray, lr: np.ndarray | None = None) -> tuple[int, str] | None:
    """(step, why) of the first diverged step of a loss trajectory, or None.

    Diverged: a non-finite loss on a step the optimizer took (lr > 0; an AMP-skipped step has lr 0),
    or a loss above LOSS_EXPLOSION x max(first finite loss, 1) — the first loss is at the initial weights."""
    loss = np.asarray(loss, dtype=np.float64)
    took = np.ones(len(loss), bool) if lr is None else np.asarray(lr) > 0
    ok = np.isfinite(loss)
    start = float(loss[np.argmax(ok)]) if ok.any() else 1.0
    limit = LOSS_EXPLOSION * max(start, 1.0)
    bad = np.flatnonzero(took & (~ok | (loss > limit)))
    if not len(bad):
        return None
    t = int(bad[0])
    if not ok[t]:
        return t, f"loss {loss[t]}"
    return t, f"loss {loss[t]:.3g}, over {LOSS_EXPLOSION:.0f}x the first step's {start:.3g}"


def check_loss_trajectory(run: Any) -> None:
    """Raise TrainingDivergedError (and record status 'diverged' in run.json) when the recorded
    trajectory of ``run`` (a RunDir) diverged; the message names the step and its LR."""
    steps = pl.read_parquet(run.steps).sort("step")
    lr = steps["lr"].to_numpy() if "lr" in steps.columns else None
    hit = diverged_at(steps["loss"].to_numpy(), lr)
    if hit is None:
        return
    t, why = hit
    at_lr = f" (lr {lr[t]:.3g})" if lr is not None else ""
    msg = f"training diverged at step {int(steps['step'][t])}{at_lr}: {why}; lower train.lr or clip (train.grad_clip)"
    run.update_meta(status="diverged", error=msg)
    raise TrainingDivergedError(f"{run.root}: {msg}")


# --- tables ------------------------------------------------------------------------------------
def _width(table: pa.Table) -> tuple[str, int]:
    """(kind, width): features -> x width; text -> longest row (tokens)."""
    if "tokens" in table.column_names:
        t = table.schema.field("tokens").type
        if pa.types.is_fixed_size_list(t):
            return "text", t.list_size
        import pyarrow.compute as pc

        lengths = pc.list_value_length(table.column("tokens"))
        return "text", int(pc.max(lengths).as_py() or 0)
    t = table.schema.field("x").type
    return "features", t.list_size if pa.types.is_fixed_size_list(t) else -1


def check_tables(tables: Mapping[str, pa.Table], names: Mapping[str, str] | None = None) -> None:
    """Refuse tables that cannot train together (TableMismatchError naming the split or file and the width).

    tables: train / val [/ test] contract tables: train and val non-empty, every split of the training
    table's kind, feature tables of one width, token rows no longer than the training table's longest
    (labels / token ids against the number of classes: :func:`dvemb.data.tables.check_classes`).
    names: split -> file or source named in messages."""
    names = names or {}

    def name(split: str) -> str:
        return f"{split} table ({names[split]})" if split in names else f"{split} table"

    for split in ("train", "val"):
        if split not in tables:
            raise TableMismatchError(f"data: no {split} table; a run needs train and val")
        if tables[split].num_rows == 0:
            raise TableMismatchError(f"data: the {name(split)} is empty (0 rows)")
    kind, width = _width(tables["train"])
    for split, t in tables.items():
        if split == "train" or t.num_rows == 0:
            continue
        k, w = _width(t)
        if k != kind:
            raise TableMismatchError(f"data: the {name(split)} holds {k}, the training table holds {kind}")
        if kind == "features" and w != width:
            raise TableMismatchError(
                f"data: the {name(split)} has feature width {w} (column x), the training table has {width}"
            )
        if kind == "text" and w > width:
            raise TableMismatchError(
                f"data: the {name(split)} has rows of {w} tokens, longer than the training table's {width}"
            )


# --- config-level, before anything is created ---------------------------------------------------
def table_files(data: Any) -> dict[str, str]:
    """split -> the user file it was read from (``cfg.data`` of a parquet / hf source), for messages."""
    if data.source not in ("parquet", "hf"):
        return {}
    paths = {"train": data.train_path, "val": data.val_path, "test": data.test_path}
    return {k: str(p) for k, p in paths.items() if p}


def check_config(cfg: Any) -> None:
    """Checks of a RunConfig that need neither data nor a run directory (the CLI runs them before it
    starts an engine): a user Parquet source names its validation table."""
    d = cfg.data
    if d.source == "parquet" and not d.val_path:
        raise DataError("data.val_path: source 'parquet' needs a validation table (set data.val_path)")


# --- segments ------------------------------------------------------------------------------------
def record_segments_used(run: Any, requested: int) -> None:
    """After training recorded its boundaries: when it uses fewer segments than ``embed.segments``
    asked for (more segments than steps), warn and make run.json say so — ``config.embed.segments``
    becomes the segments used and ``embed_segments_requested`` keeps the request."""
    meta = run.meta()
    used = len(meta["boundaries"]) - 1
    if used == requested:
        return
    log.warning(
        "embed.segments=%d but training has %d steps: using %d segments (recorded in run.json)",
        requested,
        meta.get("total_steps", used),
        used,
    )
    config = meta.get("config") or {}
    config.setdefault("embed", {})["segments"] = used
    run.update_meta(config=config, embed_segments_requested=requested)


def check_segment_index(run: Any, segments: Iterable[int]) -> list[int]:
    """The segment indices asked for, each checked against the run's segments (StoreError naming it)."""
    k = len(run.boundaries) - 1
    out = list(segments)
    for j in out:
        if not 0 <= j < k:
            raise StoreError(f"--segment {j}: {run.root} has segments 0..{k - 1} ({k} in all)")
    return out
