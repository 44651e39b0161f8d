"""Publishing a finished run: report.md + plot in the run directory, three Prefect artifacts."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dvemb.report import TOP_N, plot_markdown, top_samples, write_report
from dvemb.store.rundir import RunDir
from dvemb.summary import summary_markdown as end_summary

KEYS = {"summary": "dvemb-run-summary", "samples": "dvemb-top-samples", "plot": "dvemb-influence-by-step"}


def publish(out: str, timings: dict[str, float], config_source: dict | None = None) -> dict[str, str]:
    """Write the plot and report.md into the run and create the three artifacts; returns their keys.

    ``config_source``: ``{"file": ..., "overrides": [...]}``, shown in the summary with the resolved config.
    """
    run = RunDir(out)
    per_step, png, summary = write_report(run, timings, config_source)
    create_markdown_artifact(
        end_summary(run) + "\n" + summary,  # what dvemb run prints last, then the report's summary
        key=KEYS["summary"],
        description="dvemb run summary: config, trajectory, kept/dropped and why",
    )
    create_table_artifact(
        top_samples(run), key=KEYS["samples"], description=f"{TOP_N} most valuable and {TOP_N} most harmful samples"
    )
    create_markdown_artifact(
        plot_markdown(run, per_step, png),
        key=KEYS["plot"],
        description="influence of each step's batch: score per unit weight, and per LR (log scale)",
    )
    return dict(KEYS)
