"""``dvemb query``: score every occurrence against another validation table — a new query — beside the run's own
scores, without retraining.

The query's table has the columns of the run's own data/val.parquet (docs/RUN_DIRECTORY.md, "data/") and must
fit the run's model (feature width, classes, sequence length). It is copied into the run, so the query can be
repeated, and its scores are written next to it::

    queries/<name>/val.parquet           the query table as scored (contract columns only)
    queries/<name>/occurrences.parquet   sample_id, step, epoch, score, checkpoint (as scores/occurrences.parquet)
    queries/<name>/samples.parquet       per-sample values (as scores/samples.parquet)
    queries/<name>/query.json            source, rows, mode

The mode is ``score.mode``: ``exact`` replays the trajectory once for this objective; ``embedding`` answers from
the stored embeddings and propagators (the many-query mode: a validation gradient per checkpoint and a pass over
the embeddings; AdamW runs: the Adam-aware (theta, m, v) embeddings); ``direct`` from the gradient store.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from dvemb.config import RunConfig
from dvemb.data.tables import check_classes, load_user_table, table_features, token_lengths
from dvemb.errors import StoreError, TableValidationError
from dvemb.runtask import data_info
from dvemb.score.run import occurrence_scores, write_scores
from dvemb.store import integrity
from dvemb.store.atomic import write_json, write_parquet_atomic
from dvemb.store.rundir import RunDir

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def query_folder(run: RunDir, name: str) -> Path:
    """``queries/<name>`` of ``run``; a name is letters, digits, ``_ . -`` (at most 64), so it stays inside."""
    if not NAME.fullmatch(name):
        raise StoreError(
            f"query name {name!r}: use letters, digits, '_', '.', '-' (at most 64, not starting with . _ -)"
        )
    return run.root / "queries" / name


def fitted_table(run: RunDir, path: Path) -> pa.Table:
    """The query table at ``path``, validated against the contract and the run's model (TableValidationError
    naming the file, column, row or width)."""
    info = data_info(run)
    table = load_user_table(path, kind=info.kind)
    if not table.num_rows:
        raise TableValidationError(f"{path}: no rows")
    check_classes(table, info.n_classes, str(path))
    if info.kind == "features":
        width = table_features(table).shape[1]
        if width != info.d_in:
            raise TableValidationError(
                f"{path}: column 'x' has {width} features per row; the run's model takes {info.d_in}"
            )
    elif info.block_size is not None:
        lengths = token_lengths(table)
        if lengths.max() - 1 > info.block_size:
            row = int(np.argmax(lengths))
            raise TableValidationError(
                f"{path}: row {row} has {int(lengths[row])} tokens; the run's model reads at most {info.block_size + 1}"
            )
    return table


def query(run: RunDir, cfg: RunConfig, table: Path, name: str | None = None, force: bool = False) -> Path:
    """Score every occurrence of ``run`` against the validation table ``table``; returns the query's folder.

    name: the folder under ``queries/`` (default: the table's file stem). An existing query of that name is
    refused unless ``force`` (its files are then replaced; nothing else is touched)."""
    run.require("train")
    table = Path(table)
    folder = query_folder(run, name or table.stem)
    if (folder / "query.json").exists() and not force:
        raise StoreError(
            f"{folder}: a query named {folder.name!r} exists; pass --force to replace it or --name another"
        )
    data = fitted_table(run, table)
    if force:  # query.json is written last: until then the folder does not look like a finished query
        done = folder / "query.json"
        done.unlink(missing_ok=True)
        integrity.forget([done])
    val = write_parquet_atomic(data, folder / "val.parquet")
    occ = occurrence_scores(run, cfg, val)
    write_scores(run, cfg, occ, folder / "occurrences.parquet", folder / "samples.parquet")
    write_json(
        folder / "query.json",
        {
            "source": str(table.resolve()),
            "rows": data.num_rows,
            "score_mode": cfg.score.mode,
            "checkpoints": sorted(set(occ["checkpoint"].to_list())),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return folder
