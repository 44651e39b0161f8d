"""Flow ``query``: score a finished run's occurrences against another validation table (``dvemb query``),
beside the run's own scores, without retraining; publish the samples that helped and hurt it most.

The run may be a local run directory or a storage URI (``s3://…``): the task stages a local copy, writes
``queries/<name>/`` into it and pushes it back (dvemb.store.remote).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dvemb.pipeline import config_of
from dvemb.report import TOP_N, top_samples
from dvemb.score.query import query as query_stage
from dvemb.score.query import query_folder
from dvemb.store.remote import staged
from dvemb.store.rundir import RunDir
from flows.common import io_task, resolve_out

log = logging.getLogger("dvemb.flows")
KEYS = {"samples": "dvemb-query-top-samples", "summary": "dvemb-query-summary"}
ScoreMode = Literal["exact", "embedding", "direct"]


def _location(run: str, root: Path, folder: Path) -> str:
    """``folder`` (inside the staged copy ``root``) as the user named the run: a path or a URI."""
    return f"{run.rstrip('/')}/{folder.relative_to(root).as_posix()}"


@io_task("score-query")
def score_query(run: str, table: str, name: str | None, score_mode: ScoreMode | None, force: bool) -> str:
    """RUN/queries/NAME/{val,occurrences,samples}.parquet and query.json; returns that folder (path or URI)."""
    with staged(run) as root:
        rundir = RunDir(root)
        cfg = config_of(rundir, [f"score.mode={score_mode}"] if score_mode else [])
        folder = query_stage(rundir, cfg, Path(table).expanduser(), name, force)
        meta = json.loads((folder / "query.json").read_text())
        where = _location(run, root, folder)
    log.info("query %s: %d rows, score.mode %s -> %s", folder.name, meta["rows"], meta["score_mode"], where)
    return where


@io_task("publish-query-artifacts")
def publish_query(run: str, where: str) -> dict[str, str]:
    """The table artifact of the most helpful / harmful training samples for the query, and its summary."""
    with staged(run, read_only=True) as root:
        folder = query_folder(RunDir(root), where.rstrip("/").rsplit("/", 1)[-1])
        rows = top_samples(RunDir(root), TOP_N, samples=folder / "samples.parquet")
        meta = json.loads((folder / "query.json").read_text())
    create_table_artifact(
        rows,
        key=KEYS["samples"],
        description=f"query {folder.name}: the {TOP_N} training samples that helped and the {TOP_N} that hurt it most",
    )
    best, worst = (next(r for r in rows if r["group"] == g) for g in ("most valuable", "most harmful"))
    create_markdown_artifact(
        f"# Query `{folder.name}`\n\n"
        f"- run: `{run}`\n- table: `{meta['source']}` ({meta['rows']} rows)\n"
        f"- score.mode: **{meta['score_mode']}**, checkpoints {meta['checkpoints']}\n"
        f"- most helpful sample: {best['sample_id']} (value {best['value']}); most harmful: "
        f"{worst['sample_id']} (value {worst['value']})\n"
        f"- files: `{where}/occurrences.parquet`, `samples.parquet`\n",
        key=KEYS["summary"],
        description=f"query {folder.name} of {run}",
    )
    return dict(KEYS)


@flow(name="query")
def query(
    run: str,
    table: str,
    name: str | None = None,
    score_mode: ScoreMode | None = None,
    force: bool = False,
) -> str:
    """Score every training occurrence of a finished run against another validation table (a new query),
    beside the run's own scores, without retraining; returns the query's folder, RUN/queries/NAME.

    Args:
        run: the finished run: a run directory (absolute, or relative to the worker's working directory,
            the checkout: e.g. runs/nightly-digits_mlp-20250101) or a storage URI (s3://bucket/prefix/run).
        table: a Parquet file (path on the worker) with the columns of the run's own data/val.parquet
            (sample_id, label, and x or tokens) that fits the run's model: feature width, classes,
            sequence length.
        name: the query's folder under RUN/queries/ (letters, digits, _ . -); empty: the table's file name
            without .parquet.
        score_mode: exact (replay the trajectory for this objective), embedding (from the stored
            embeddings: the fast one for many queries) or direct; empty: the mode the run was scored in.
        force: replace an existing query of that name (only its files; nothing else in the run changes).
    """
    run = resolve_out(run)
    where = score_query(run, str(Path(table).expanduser().resolve()), name, score_mode, force)
    publish_query(run, where)
    return where
