"""Serve dvemb's deployments with one command: ``python deployments/serve.py``.

* ``pipeline/nightly-curation``: cron ``0 2 * * *`` — train, embed, score and curate into
  ``runs/nightly-YYYYMMDD`` (a fresh directory each night).
* ``pipeline/on-demand``: no schedule; trigger it from the UI (Run > Custom run) or with
  ``prefect deployment run 'pipeline/on-demand'``.

Both default to ``configs/digits_mlp.yaml``; every field of the config is editable in the UI form.
Needs a Prefect API (``PREFECT_API_URL``); see docs/PREFECT.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python deployments/serve.py` from a checkout finds flows/

from dvemb.config import RunConfig, load_config  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "digits_mlp.yaml"
NIGHTLY_CRON = "0 2 * * *"
NAMES = ("nightly-curation", "on-demand")


def default_config(path: Path | None) -> RunConfig:
    if path is not None:
        return load_config(path)
    if DEFAULT_CONFIG.exists():
        return load_config(DEFAULT_CONFIG)
    return load_config(None, ["data.source=digits", "train.epochs=2", "embed.segments=3"])


def build(config: RunConfig, runs: Path, only: list[str] | None = None) -> list[RunnerDeployment]:
    """The nightly (scheduled) and on-demand deployments of the pipeline flow."""
    params = {"config": config.model_dump(mode="json")}
    deployments = {
        "nightly-curation": pipeline.to_deployment(
            name="nightly-curation",
            cron=NIGHTLY_CRON,
            parameters={**params, "out": str(runs / "nightly-{now:%Y%m%d}"), "force": True},
            description="Nightly: train, embed, score and curate; the curated table lands in RUN/curation/.",
            tags=["dvemb", "scheduled"],
        ),
        "on-demand": pipeline.to_deployment(
            name="on-demand",
            parameters={**params, "out": str(runs / "on-demand-{now:%Y%m%d-%H%M%S}"), "force": False},
            description="Run the whole dvemb pipeline once; edit the config in the form.",
            tags=["dvemb", "on-demand"],
        ),
    }
    return [deployments[n] for n in (only or NAMES)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="default run config of both deployments (YAML)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder the run directories go to")
    ap.add_argument("--only", choices=NAMES, action="append", help="serve only this deployment (repeatable)")
    ap.add_argument("--limit", type=int, default=2, help="flow runs executed at once")
    args = ap.parse_args(argv)
    serve(*build(default_config(args.config), args.runs.resolve(), args.only), limit=args.limit)


if __name__ == "__main__":
    main()
