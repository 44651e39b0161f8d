"""The whole chain in one process, without Prefect (the CLI's ``--engine local``; tests), and the pieces
every engine shares: config files by name, the checks that run before training, and the stage log lines.

Stage log lines go to the ``dvemb.pipeline`` logger (INFO): the flows forward ``dvemb.*`` records to the
Prefect run's Logs tab; the CLI shows them with ``-v``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import torch
import yaml

from dvemb.checks import check_config
from dvemb.config import ConfigError, RunConfig, load_config
from dvemb.curate.run import curate
from dvemb.embed.run import embed_segment
from dvemb.progress import stage_extra
from dvemb.report import drop_reason, write_report
from dvemb.score.run import score
from dvemb.store import integrity, remote
from dvemb.store.rundir import RunDir, RunExistsError
from dvemb.train.resume import check_same_config
from dvemb.train.run import train

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_of(run: RunDir, overrides: list[str] = ()) -> RunConfig:
    """The config recorded in ``run``/run.json, with ``--set`` overrides applied."""
    return load_config(None, list(overrides), base=run.meta()["config"])


def config_files() -> list[str]:
    """The shipped run configs, as ``configs/<name>.yaml`` (the choices a deployment form offers)."""
    return sorted(f"configs/{p.name}" for p in CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []


def find_config(path: str | Path) -> Path:
    """A config file by path: absolute, relative to the working directory, or relative to the checkout
    (``configs/x.yaml``; a bare ``x.yaml`` / ``x`` is looked up in ``configs/``). ConfigError names it."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, CONFIGS.parent / p, CONFIGS / p, CONFIGS / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ConfigError(f"config {str(path)!r}: no such config file (looked at {looked}); choose one of {config_files()}")


def resolve_config(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, Path]:
    """``path`` (see :func:`find_config`) with ``key.path=value`` overrides merged onto that file; validated."""
    file = find_config(path)
    return load_config(file, list(overrides)), file


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run logs at its start and shows in its summary)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120)


def check_device(device: str, field: str = "embed.device") -> None:
    """ConfigError when ``device`` is not a torch device or not present here (a retry would not help)."""
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"{field}: {device!r} is not a torch device ({e})") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (d.index or 0) >= n:
            raise ConfigError(f"{field}: {device!r}, but this machine has {n} CUDA device(s); use 'cpu'")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: 'mps', but no MPS device is available here; use 'cpu'")


def preflight(
    cfg: RunConfig, out: str | Path, force: bool, force_name: str = "--force", resume: bool = False
) -> RunDir | None:
    """Checks that fail fast, before any training: the devices of ``cfg``, then the run directory
    (made, or emptied when ``force``, by the run directory's own rules). Returns the run directory;
    None for a remote ``out`` (a URI: the same overwrite rule applied to the store, nothing staged yet).

    ``force_name``: how the caller spells the overwrite switch (``--force`` on the CLI, ``force=true``
    as a flow parameter), named in the error. ``resume``: a run already in ``out`` is kept, to be
    continued (its config must be ``cfg``; checked again when training resumes).
    """
    check_config(cfg)
    check_device(cfg.embed.device)
    if remote.is_remote(out):
        remote.prepare(out, force, resume=resume, force_name=force_name)
        return None
    run = RunDir(out)
    if resume and run.run_json.is_file():
        check_same_config(run, cfg)
        return run
    try:
        run.create(force=force)
    except RunExistsError:
        raise RunExistsError(
            f"out {str(run.root)!r}: the run directory exists and holds a run; set {force_name} to overwrite it "
            "or choose another out"
        ) from None
    return run


# --- stage log lines (counts, loss, paths) ----------------------------------------------------------


def describe_train(run: RunDir) -> str:
    steps = pl.read_parquet(run.steps)
    per_epoch = steps.group_by("epoch").agg(pl.col("loss").mean()).sort("epoch")
    losses = ", ".join(f"{r['epoch']}: {r['loss']:.4f}" for r in per_epoch.to_dicts())
    n_train = pl.scan_parquet(run.data("train")).select(pl.len()).collect().item()
    return (
        f"train: {steps.height} steps over {per_epoch.height} epochs on {n_train} training rows; "
        f"loss {steps['loss'][0]:.4f} -> {steps['loss'][-1]:.4f} (mean per epoch {losses}); "
        f"checkpoints at steps {run.boundaries}; run directory {run.root}"
    )


def describe_segment(run: RunDir, segment: int) -> str:
    b = run.boundaries
    k = len(b) - 1
    where = f"embed: segment {segment + 1}/{k} (steps {b[segment]}-{b[segment + 1]})"
    if not run.embeddings(segment).exists():
        return f"{where}: nothing written (embed.write: the scoring mode needs no embeddings)"
    return f"{where} -> {run.embeddings(segment)}, {run.propagator(segment)}"


def describe_score(run: RunDir) -> str:
    occ = pl.scan_parquet(run.occurrences)
    n, k = occ.select(pl.len(), pl.col("checkpoint").n_unique()).collect().row(0)
    values = pl.read_parquet(run.samples, columns=["value"])["value"]
    return (
        f"score: {n} occurrence scores at {k} checkpoint(s) -> {run.occurrences}; "
        f"values of {values.len()} samples ({(values > 0).sum()} helped, {(values < 0).sum()} hurt) -> {run.samples}"
    )


def describe_curate(run: RunDir) -> str:
    plan = json.loads(run.plan.read_text())
    ph = plan.get("phases") or {}
    phases = (
        f"; phases early [0, {ph['early_end']}), middle [{ph['early_end']}, {ph['late_start']}), "
        f"late [{ph['late_start']}, {ph['total_steps']})"
        if ph
        else ""
    )
    return (
        f"curate: kept {plan['n_kept']} of {plan['n_train']} training rows, dropped {plan['n_dropped']} "
        f"({drop_reason(plan.get('policy', {}))}){phases} -> {run.curated}, {run.plan}"
    )


def log_stage(run: RunDir, stage: str, segment: int | None = None) -> None:
    """Log what ``stage`` (train / embed / score / curate) left in ``run``: counts, loss, paths. The record
    carries the stage (``dvemb.progress.stage_extra``: the CLI's display prints it as the stage's line)."""
    if stage == "embed" and segment is not None:
        k = len(run.boundaries) - 1
        extra = stage_extra(stage, segment, k, wrote=run.embeddings(segment).exists())
        log.info(describe_segment(run, segment), extra=extra)
    elif stage in STAGE_LINES:
        log.info(STAGE_LINES[stage](run), extra=stage_extra(stage))


STAGE_LINES = {"train": describe_train, "score": describe_score, "curate": describe_curate}


def intact(run: RunDir, paths: list[Path]) -> bool:
    """Every one of ``paths`` (files of ``run``) exists and matches its manifest entry (sha256) and format."""
    return all(p.exists() for p in paths) and not integrity.damaged(run.root, paths, deep=True)


def missing_segments(run: RunDir) -> list[int]:
    """Segments whose embeddings or propagator are missing or damaged (what a resumed embed stage does);
    none when the run's embed stage writes no files (``RunDir.expected``)."""
    wanted = set(run.expected("embed"))
    k = len(run.boundaries) - 1
    files = {j: [run.embeddings(j), run.propagator(j)] for j in range(k)}
    return [j for j, paths in files.items() if wanted & set(paths) and not intact(run, paths)]


@contextmanager
def stopwatch(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[stage]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def run_local(
    cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True, resume: bool = False
) -> RunDir:
    """train -> embed (every segment) -> score -> curate, sequentially; then report.md, with the wall time
    of every stage that ran (also recorded in run.json ``timings``).

    resume: continue an interrupted run: training from its last boundary checkpoint (dvemb.train.resume),
    then only the segments and stages whose outputs are missing or damaged (a stage after one that did
    work is redone)."""
    check_device(cfg.embed.device)
    log.info("config %s:\n%s", cfg.name, config_yaml(cfg))
    timings: dict[str, float] = {}
    with stopwatch(timings, "train"):
        run = train(cfg, RunDir(out), force=force, progress=progress, resume=resume)
    log_stage(run, "train")
    todo = missing_segments(run) if resume else list(range(len(run.boundaries) - 1))
    if resume:
        log.info("embed: %d segment(s) to do %s, the others are kept", len(todo), todo)
    with stopwatch(timings, "embed"):
        for j in todo:
            embed_segment(run, j, cfg.embed)
            log_stage(run, "embed", j)
    redo = bool(todo) or not resume
    for stage, fn in (("score", score), ("curate", curate)):
        if redo or not intact(run, run.expected(stage)):
            with stopwatch(timings, stage):
                fn(run, cfg)
            log_stage(run, stage)
            redo = True
        else:
            log.info("%s: kept (its files are intact)", stage, extra=stage_extra(stage))
    if redo or not run.report.exists():
        write_report(run, timings)
    return run
