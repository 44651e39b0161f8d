"""Publishing a finished run: report.md + plot in the run directory, three Prefect artifacts."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dvemb.report import TOP_N, plot_markdown, top_samples, write_report
from dvemb.store.rundir import RunDir


def publish(out: str, timings: dict[str, float]) -> dict[str, str]:
    """Write the plot and report.md into the run and create the three artifacts; returns their keys."""
    run = RunDir(out)
    per_step, png, summary = write_report(run, timings)
    keys = {"summary": "dvemb-run-summary", "samples": "dvemb-top-samples", "plot": "dvemb-influence-by-step"}
    create_markdown_artifact(summary, key=keys["summary"], description="dvemb run summary")
    create_table_artifact(
        top_samples(run), key=keys["samples"], description=f"{TOP_N} most valuable and {TOP_N} most harmful samples"
    )
    create_markdown_artifact(
        plot_markdown(run, per_step, png), key=keys["plot"], description="mean occurrence score per step"
    )
    return keys
