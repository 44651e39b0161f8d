"""Flow ``pipeline``: resolve the config -> train -> embed (segments in parallel) -> score -> curate, then
publish the run's artifacts and, when asked (the nightly deployment), the curated dataset as a new version.

The stages are the tasks of the stage flows (flows/train.py, embed.py, score.py, curate.py), called as tasks
of this one flow run: one run graph, and every stage's log lines in this run's Logs tab.

Its parameters are what a person fills in: a config file (the shipped ones are a dropdown), overrides
merged onto THAT file, the run directory, ``force``, and where to publish the curated dataset.

Engines: Prefect's default task runner runs the mapped and submitted tasks (the embedding segments, the
scoring) in threads of the flow's process; :func:`dask_runner` swaps in ``prefect_dask.DaskTaskRunner`` so
the same tasks run on a Dask cluster's workers (``pipeline.with_options(task_runner=dask_runner(...))``).
Tasks exchange run-directory paths or URIs, never tensors: the workers need the run directory on a shared
filesystem, or a remote one (``out: s3://…``; each task stages a local copy, dvemb.store.remote).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from dvemb.config import RunConfig
from dvemb.curate.publish import publish_version, read_version
from dvemb.errors import DvembError
from dvemb.pipeline import config_yaml, preflight, resolve_config
from dvemb.store.remote import staged
from dvemb.store.rundir import RunDir
from flows.common import DEFAULT_CONFIG, ConfigFile, io_task, own_partial_run, resolve_out, run_time
from flows.curate import curate_data
from flows.embed import compose, count_segments, embed_segment
from flows.report import publish as publish_run
from flows.score import score_occurrences
from flows.train import train_model

log = logging.getLogger("dvemb.flows")
PUBLISHED_EVENT = "dvemb.dataset.published"
SCHEDULER_TIMEOUT_S = 5


class ClusterError(DvembError):
    """A Dask scheduler address that is malformed or does not answer."""


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT_S) -> int:
    """Connect to the Dask scheduler at ``address`` (``tcp://host:port``) within ``timeout`` seconds;
    returns its number of workers. ClusterError names the address when it is malformed or does not answer."""
    import socket

    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    def fail(why: str) -> ClusterError:
        return ClusterError(
            f"--address {address!r}: {why}; give a running Dask scheduler's tcp://host:port, "
            "or leave --address out for a local cluster"
        )

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as e:
        raise fail(f"not a scheduler address ({e})") from None
    if scheme != "tcp":
        raise fail(f"scheme {scheme!r}; only tcp:// is supported")
    try:  # a port nobody listens on fails here at once
        socket.create_connection((host, port), timeout=timeout).close()
        info = asyncio.run(asyncio.wait_for(_identity(address, timeout), timeout))
    except (OSError, TimeoutError) as e:
        raise fail(f"no Dask scheduler answered within {timeout:g} s ({e or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - whatever the reply was, it is not a scheduler's
        raise fail(f"something answers there, but not a Dask scheduler ({type(e).__name__})") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        raise fail("something answers there, but not a Dask scheduler")
    return len(info.get("workers", {}))


async def _identity(address: str, timeout: float) -> dict:
    """The scheduler's ``identity`` (type, workers, ...) over one short-lived connection."""
    from distributed.core import rpc

    async with rpc(address, timeout=timeout) as r:
        return await r.identity()


@contextmanager
def shared_api() -> Iterator[None]:
    """The Prefect API that the flow and its Dask workers report to: ``PREFECT_API_URL`` when set; else
    Prefect's temporary server, started here, its URL in the settings the task runner sends each task
    (a worker would otherwise start a temporary server of its own)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    server = SubprocessASGIServer()  # the one the flow's own client would start (one per process)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def dask_runner(address: str | None = None, workers: int = 2):
    """``prefect_dask.DaskTaskRunner`` on the scheduler at ``address``, else on a new LocalCluster of
    ``workers`` processes (one thread each) that lives as long as the flow run."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


@task(name="resolve-config", cache_policy=NO_CACHE)
def resolve(config: str, overrides: list[str], out: str, force: bool) -> tuple[RunConfig, str, bool, dict]:
    """The config file with its overrides, validated and logged; the run directory checked (before any
    training). Returns (config, absolute out, force, config source)."""
    cfg, file = resolve_config(config, overrides)
    log.info("config %s with overrides %s, resolved:\n%s", file, list(overrides) or "(none)", config_yaml(cfg))
    out = resolve_out(out, name=cfg.name)
    resume = not force and own_partial_run(out)
    if resume:  # train-model continues it from its last boundary checkpoint
        log.warning("retry of this flow run: %s holds its own earlier, unfinished attempt; continuing it", out)
    preflight(cfg, out, force, force_name="force=true (the CLI: --force)", resume=resume)
    log.info("run directory %s", out)
    return cfg, out, force, {"file": str(file), "overrides": list(overrides)}


@io_task("publish-artifacts")
def publish(out: str, timings: dict[str, float], config_source: dict) -> dict[str, str]:
    """Influence plot + report.md in the run; summary, top-samples and plot artifacts in Prefect."""
    with staged(out) as root:
        keys = publish_run(str(root), timings, config_source)
    log.info("report %s; artifacts %s", out.rstrip("/") + "/report.md", sorted(keys.values()))
    return keys


@task(name="publish-dataset", cache_policy=NO_CACHE)
def publish_dataset(out: str, root: str, config_source: dict) -> str:
    """The curated table as the next immutable version under ``root``; emits ``dvemb.dataset.published``
    (the retrain deployment's trigger) with the version folder in its payload. No retries: a version is
    never written twice."""
    from prefect.runtime import flow_run

    source = {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, **config_source}
    with staged(out, read_only=True) as run_root:
        folder = publish_version(RunDir(run_root), resolve_out(root), source=source)
    _, manifest = read_version(folder)
    name, version, rows = manifest["name"], manifest["version"], manifest["rows"]
    sha = manifest["files"]["curated.parquet"]["sha256"]
    log.info("published %s %s: %d rows, sha256 %s -> %s", name, version, rows, sha, folder)
    create_markdown_artifact(
        f"# Dataset `{name}` {version}\n\n- folder: `{folder}`\n- rows: **{rows}** (kept "
        f"{manifest['curation']['n_kept']} of {manifest['curation']['n_train']})\n- curated.parquet sha256: "
        f"`{sha}`\n- source run: `{manifest['source']['run']}`\n- config: `{config_source['file']}` "
        f"{config_source['overrides'] or ''}\n",
        key="dvemb-dataset-version",
        description=f"curated dataset {name} {version}",
    )
    emit_event(
        event=PUBLISHED_EVENT,
        resource={"prefect.resource.id": f"dvemb.dataset.{name}.{version}", "prefect.resource.name": name},
        payload={"dataset": str(folder), "name": name, "version": version, "rows": rows, "sha256": sha},
    )
    return str(folder)


@contextmanager
def stopwatch(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of the ``with`` block as ``timings[stage]`` (seconds)."""
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


@flow(name="pipeline")
def pipeline(
    config: ConfigFile = DEFAULT_CONFIG,
    overrides: list[str] = [],  # noqa: B006 (a Prefect form default; never mutated)
    out: str = "runs/{name}-{now:%Y%m%d-%H%M%S}",
    force: bool = False,
    publish_to: str = "",
) -> str:
    """Train, embed, score and curate one run; publish its report and artifacts (and the curated dataset).

    Args:
        config: the run config file: one of configs/ (dropdown), or a path (absolute, or relative to the
            worker's working directory).
        overrides: changes to THAT file, one "key.path=value" per item, e.g. "train.epochs=5" or
            "curate.drop=quantile". Each must name a config field, or the run fails before training.
        out: the run directory to create. {name} is the config's name, {now:%Y%m%d} the run's scheduled
            time (a retry resolves to the same folder). It must not hold a run unless force is set.
        force: overwrite out if it already holds a run (its files are deleted first).
        publish_to: a datasets folder (e.g. datasets): publish the curated table as its next immutable
            version, datasets/NAME/vNNNN, and emit the dvemb.dataset.published event that starts the
            retrain-curated deployment. Empty: do not publish.
    """
    cfg, run, force, source = resolve(config, list(overrides), out, force)
    log.info("pipeline %s (scheduled %s) -> %s", cfg.name, run_time().isoformat(timespec="seconds"), run)
    timings: dict[str, float] = {}
    with stopwatch(timings, "train"):
        train_model(cfg, run, force)
    with stopwatch(timings, "embed"):
        segments = embed_segment.map(unmapped(run), range(count_segments(run)), unmapped(cfg.embed))
        compose(run, segments.result())
    with stopwatch(timings, "score"):
        score_occurrences.submit(cfg, run).result()  # on the task runner (a Dask worker with --engine dask)
    with stopwatch(timings, "curate"):
        curate_data(cfg, run)
    publish(run, timings, source)
    if publish_to:
        publish_dataset(run, publish_to, source)
    return run
