"""Serve dvemb's deployments in one process, no work pool: ``python deployments/serve.py``.

The deployments are those of ``prefect.yaml`` (read from it: names, schedules, parameters, triggers):

* ``pipeline/nightly-curation``: cron ``0 2 * * *`` (UTC) — train, embed, score and curate into
  ``runs/nightly-<name>-YYYYMMDD``, then publish the curated table as ``datasets/<name>/vNNNN``;
* ``pipeline/on-demand``: no schedule; Run > Custom run in the UI, or ``prefect deployment run``;
* ``query/on-demand``: no schedule; scores a finished run against another validation table (``dvemb
  query``); its ``run`` and ``table`` are paths on this machine (relative ones: to this process's working
  directory) or URIs;
* ``retrain/retrain-curated``: started by its trigger when a version is published (event
  ``dvemb.dataset.published``): curated vs full vs random retraining.

``--runs`` / ``--datasets`` move the run and dataset folders (default: ``runs/``, ``datasets/`` of the
checkout); ``--config`` changes the pipeline deployments' default config file. Needs a Prefect API
(``PREFECT_API_URL``); see docs/PREFECT.md. For workers and a work pool, use ``prefect deploy --all``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python deployments/serve.py` from a checkout finds flows/

from flows.pipeline import pipeline  # noqa: E402
from flows.query import query  # noqa: E402
from flows.retrain import retrain  # noqa: E402

FLOWS = {"flows/pipeline.py:pipeline": pipeline, "flows/query.py:query": query, "flows/retrain.py:retrain": retrain}


def spec(path: Path = ROOT / "prefect.yaml") -> list[dict[str, Any]]:
    """The deployments declared in prefect.yaml."""
    return yaml.safe_load(path.read_text())["deployments"]


def full_name(d: dict[str, Any]) -> str:
    """``flow/deployment`` of a declared deployment (names repeat across flows: ``pipeline/on-demand``,
    ``query/on-demand``)."""
    return f"{FLOWS[d['entrypoint']].name}/{d['name']}"


def _moved(value: Any, folder: str, to: Path | None) -> Any:
    """``runs/x`` -> ``<to>/x`` (a run or dataset path of prefect.yaml, relative to the checkout)."""
    if not isinstance(value, str):
        return value
    p = Path(value)
    if p.is_absolute():
        return value
    if to is not None and p.parts[:1] == (folder,):
        return str(to.joinpath(*p.parts[1:]))
    return str(ROOT / p)


def build(
    runs: Path | None = None, datasets: Path | None = None, config: str | None = None, only: list[str] | None = None
) -> list[RunnerDeployment]:
    """prefect.yaml's deployments as served deployments (paths made absolute, optionally moved)."""
    out = []
    for d in spec():
        if only and full_name(d) not in only and d["name"] not in only:
            continue
        params = dict(d.get("parameters") or {})
        if "out" in params:
            params["out"] = _moved(params["out"], "runs", runs)
        if params.get("publish_to"):
            params["publish_to"] = _moved(params["publish_to"], "datasets", datasets)
        if config is not None and "config" in params:
            params["config"] = config
        out.append(
            FLOWS[d["entrypoint"]].to_deployment(
                name=d["name"],
                schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in d.get("schedules") or []],
                parameters=params,
                description=d.get("description"),
                tags=d.get("tags"),
                triggers=[DeploymentEventTrigger(**t) for t in d.get("triggers") or []],
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    names = [full_name(d) for d in spec()] + sorted({d["name"] for d in spec()})
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="default config file of the pipeline deployments (e.g. configs/mnist_mlp.yaml)")
    ap.add_argument("--runs", type=Path, help="folder the run directories go to (default: runs/ of the checkout)")
    ap.add_argument("--datasets", type=Path, help="folder of the published datasets (default: datasets/)")
    ap.add_argument(
        "--only",
        choices=names,
        action="append",
        help="serve only this deployment: flow/name, or a name (all flows' deployments of that name); repeatable",
    )
    ap.add_argument("--limit", type=int, default=2, help="flow runs executed at once")
    args = ap.parse_args(argv)
    runs = args.runs.resolve() if args.runs else None
    datasets = args.datasets.resolve() if args.datasets else None
    serve(*build(runs, datasets, args.config, args.only), limit=args.limit)


if __name__ == "__main__":
    main()
