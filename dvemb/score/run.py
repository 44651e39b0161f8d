"""Stage ``score``: validation gradients at the final and intermediate checkpoints, occurrence scores."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import polars as pl
import torch

from dvemb.capture.fisher import captures_curvature
from dvemb.capture.hooks import GradientCapture
from dvemb.checks import finite_frame
from dvemb.config import RunConfig
from dvemb.data import TableDataModule
from dvemb.embed.curvature import curvature_fn, recorded_curvature
from dvemb.embed.direct import direct_scores
from dvemb.embed.recorded_state import curvature_advice, state_kind
from dvemb.embed.run import DTYPES, embedded_settings, load_embeddings
from dvemb.embed.segments import CurvatureFn
from dvemb.runtask import model_at, task_of
from dvemb.score.exact import exact_occurrences
from dvemb.score.scores import occurrence_table, segment_scores
from dvemb.score.state import state_occurrence_scores
from dvemb.score.validation import validation_gradients
from dvemb.score.values import run_phases, value_table
from dvemb.store.atomic import atomic_path
from dvemb.store.gc import check_not_dropped
from dvemb.store.gradstore import SegmentedRecords, read_projection, read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_schedule, read_steps
from dvemb.types import ProjectionConfig, StepGrads

log = logging.getLogger(__name__)


def val_vectors(
    run: RunDir, cfg: RunConfig, step: int, batch_size: int = 512, table: Path | None = None
) -> dict[str, torch.Tensor]:
    """Projected gradient of the mean validation loss at checkpoint ``step``: layer -> [1, D].

    table: the validation table (default: the run's own, data/val.parquet)."""
    task = task_of(run, cfg)
    model = model_at(run, step, task)
    c = cfg.capture
    cap = GradientCapture(model, ProjectionConfig.of(c), c.layers)
    dtype = next(model.parameters()).dtype
    dm = TableDataModule(table or run.data("val"), batch_size=batch_size, shuffle=False, dtype=dtype)
    ds = dm.datasets["train"]
    batches = (ds.batch(rows) for rows in dm.train_sampler.plan(0))
    n = len(ds)
    sums = validation_gradients(
        task, model, cap, batches, reduce=False, store_projection=read_projection(run.projection)
    )
    cap.remove()
    return {k: v.sum(0, keepdim=True) / n for k, v in sums.items()}


def grad_records(run: RunDir) -> SegmentedRecords:
    """The stored gradients of every step, read one segment at a time."""
    b = run.boundaries
    paths = [run.grads(j) for j in range(len(b) - 1)]
    check_not_dropped(run, paths, "score")
    return SegmentedRecords(paths, b, kind="grads")


def occurrence_index(paths: list[Path], bounds: list[int], kind: str) -> list[StepGrads]:
    """Step, sample ids and weights of every stored record, without vectors (what an occurrence table
    needs): segment files ``paths`` holding steps ``bounds[j] .. bounds[j + 1] - 1``, in step order."""
    out = []
    for j, path in enumerate(paths):
        for r in read_segment(path, range(bounds[j], bounds[j + 1]), kind=kind, vectors=False):
            out.append(StepGrads(r.step, r.sample_ids.clone(), r.weights.clone(), {}))
    return out


def segment_curvature(run: RunDir, name: str, bounds: list[int]) -> CurvatureFn | None:
    """``curvature_fn`` for any step, holding the stored vectors of one segment at a time (None: empirical; the
    exact Hessian replays one segment at a time itself)."""
    name = recorded_curvature(run) if name is None else name
    if not captures_curvature(name):
        return curvature_fn(run, name, range(len(bounds) - 1))
    held: dict[int, CurvatureFn] = {}

    def fn(rec: StepGrads):
        j = bisect.bisect_right(bounds, rec.step) - 1
        if j not in held:
            held.clear()
            held[j] = curvature_fn(run, name, [j])
        return held[j](rec)

    return fn


def occurrence_scores(run: RunDir, cfg: RunConfig, val: Path | None = None) -> pl.DataFrame:
    """sample_id, step, epoch, score, checkpoint of every occurrence at the final checkpoint (and every
    intermediate one with ``score.checkpoints``) in ``score.mode``, against the validation table ``val`` (default:
    the run's own). Embedding and direct modes stream: one segment's gradients (or embeddings and propagator)
    in memory at a time, whatever the number of steps."""
    run.require("train")
    b = run.boundaries
    k = len(b) - 1
    checkpoints = range(1, k + 1) if cfg.score.checkpoints else [k]
    dtype, device = DTYPES[cfg.embed.dtype], cfg.embed.device
    embed = cfg.embed
    if cfg.score.mode == "embedding":  # answered from the embeddings as built, whatever embed.* says here
        built = embedded_settings(run)
        if differ := {k: v for k, v in built.items() if getattr(embed, k) != v}:
            log.warning(
                "%s: the embeddings were built with %s; embedding mode answers from them as built, not with %s: "
                "re-embed with `dvemb embed %s %s --set embed.write=always` for that",
                run.root,
                ", ".join(f"embed.{k}={v}" for k, v in built.items()),
                ", ".join(f"embed.{k}={getattr(embed, k)}" for k in differ),
                run.root,
                " ".join(f"--set embed.{k}={getattr(embed, k)}" for k in built),
            )
        embed = embed.model_copy(update=built)
    if cfg.score.mode != "exact" and (advice := curvature_advice(run, embed.curvature, embed.blocks)):
        log.warning(advice)
    tables = []
    if cfg.score.mode == "exact":
        tables.append(exact_occurrences(run, cfg, val))
    elif cfg.score.mode == "direct" and state_kind(run):  # AdamW / momentum: the linearised state recursion
        index = occurrence_index(grad_records(run).files, b, "grads")
        for m in checkpoints:
            s = state_occurrence_scores(run, cfg, b[m], val_vectors(run, cfg, b[m], table=val))
            tables.append(occurrence_table(index[: b[m]], s, checkpoint=b[m]))
    elif cfg.score.mode == "embedding":
        local, props = load_embeddings(run, device)
        index = occurrence_index([run.embeddings(j) for j in range(k)], b, "embeddings")
        for m in checkpoints:
            s = segment_scores(local, props, val_vectors(run, cfg, b[m], table=val), upto=m)
            tables.append(occurrence_table(index[: b[m]], s, checkpoint=b[m]))
    else:
        records = grad_records(run)
        index = occurrence_index(records.files, b, "grads")
        schedule = read_schedule(run)
        curv = segment_curvature(run, cfg.embed.curvature, b)
        for m in checkpoints:
            v = val_vectors(run, cfg, b[m], table=val)
            s = direct_scores(
                records[: b[m]], schedule, v, dtype=dtype, device=device, curvature=curv, blocks=cfg.embed.blocks
            )
            tables.append(occurrence_table(index[: b[m]], s, checkpoint=b[m]))
    epochs = read_steps(run).select("step", "epoch")
    occ = (
        pl.concat(tables)
        .join(epochs, on="step", how="left")
        .select("sample_id", "step", "epoch", "score", "checkpoint")
        .sort("checkpoint", "step", "sample_id")
    )
    finite_frame(occ, "scores")
    return occ


def write_scores(run: RunDir, cfg: RunConfig, occ: pl.DataFrame, occurrences: Path, samples: Path) -> None:
    """Write ``occ`` and its per-sample values (the run's phases) as Parquet, atomically."""
    values = value_table(occ, run_phases(run, cfg.curate, occ))
    finite_frame(values, "per-sample values")
    for df, path in ((occ, occurrences), (values, samples)):
        with atomic_path(path) as tmp:
            df.write_parquet(tmp)


def score(run: RunDir, cfg: RunConfig) -> str:
    """Write scores/occurrences.parquet (every occurrence at every checkpoint) and scores/samples.parquet."""
    write_scores(run, cfg, occurrence_scores(run, cfg), run.occurrences, run.samples)
    return str(run.occurrences)
