"""The end summary of a run (what ``dvemb run`` prints last), read from the run directory alone.

About fifteen lines: the stages and their wall times (run.json ``timings``), the training, the scoring
mode and what it means for fidelity, the most helpful and most harmful training samples, what curation
kept and dropped and why, and where report.md is. :func:`summary_rows` holds the content;
:func:`render` (rich, the CLI) and :func:`summary_markdown` (a Prefect artifact) only lay it out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from dvemb.report import drop_reason, top_samples
from dvemb.store.rundir import RunDir

TOP = 3
STAGE_ORDER = ("train", "embed", "score", "curate")


def fidelity(run: RunDir, meta: dict) -> str:
    """The scoring mode of ``run`` and what it means for how close the scores are to leave-one-out."""
    c = meta["config"]
    mode = c["score"]["mode"]
    kind = meta.get("optimizer", {}).get("kind", c["train"]["optimizer"])
    if mode == "exact":
        return f"exact: exact first-order leave-one-out through the recorded optimizer ({kind}; one reverse sweep)"
    cap, emb = c["capture"], c["embed"]
    store = f"{cap['kind']} projection k_a={cap['k_a']} x k_s={cap['k_s']}"
    model = f"{emb['curvature']} curvature, {emb['blocks']} blocks, {store}"
    if kind in ("adamw", "sgd"):
        from dvemb.embed.recorded_state import state_kind

        quiet = logging.getLogger("dvemb.embed.recorded_state")
        was, quiet.disabled = quiet.disabled, True  # the score stage has already warned about the SGD proxy
        try:
            state = state_kind(run)
        finally:
            quiet.disabled = was
        if state:
            what = "AdamW (parameters and both moments)" if state == "adamw" else "SGD momentum (parameters and buffer)"
            source = "their data value embeddings" if mode == "embedding" else "the stored gradients"
            return (
                f"{mode}: approximate first-order leave-one-out through the linearised {what} "
                f"({emb['curvature']} curvature), from {source} ({store})"
            )
        if kind == "adamw":
            model += "; AdamW treated as SGD with the recorded LR (proxy)"
    how = "from the data value embeddings" if mode == "embedding" else "from the stored gradients"
    return f"{mode}: approximate first-order leave-one-out through a curvature model ({model}), {how}"


def stage_times(meta: dict) -> str:
    """``train 8.1 s · embed 0.0 s · … = 10.5 s`` from run.json ``timings``; empty when not recorded."""
    t = meta.get("timings") or {}
    if not t:
        return ""
    names = [s for s in STAGE_ORDER if s in t] + [s for s in t if s not in STAGE_ORDER]
    return " · ".join(f"{s} {t[s]:.1f} s" for s in names) + f" = {sum(t.values()):.1f} s"


def curation_sentence(run: RunDir, plan: dict) -> str:
    """Kept / dropped counts, the rule in words, and the range of the dropped rows' values."""
    n, kept, dropped = plan["n_train"], plan["n_kept"], plan["n_dropped"]
    policy = plan.get("policy", {})
    share = f" ({dropped / n:.1%})" if n else ""
    text = f"kept {kept} of {n} training rows, dropped {dropped}{share} — {drop_reason(policy)}"
    by = policy.get("filter_by", "value")
    if dropped and run.samples.exists() and by in pl.read_parquet_schema(run.samples):
        v = pl.read_parquet(run.samples, columns=["sample_id", by]).sort(by, "sample_id")[by]  # as the filter ranks
        text += f"; dropped {by} {v[0]:+.2e} to {v[min(dropped, v.len()) - 1]:+.2e}"
    return text


def summary_rows(run: RunDir, location: str | None = None) -> list[tuple[str, str]]:
    """(field, text) rows of the summary, report.md last; what a stage that has not run would show is left out.
    location: where the run is shown to be (a remote run's URI rather than its staged copy; default run.root)."""
    meta = run.meta()
    where = (location or str(run.root)).rstrip("/")
    rows = [("run", f"{meta['config']['name']} → {where}")]
    if times := stage_times(meta):
        rows.append(("stages", times))
    if run.steps.exists():
        steps = pl.read_parquet(run.steps, columns=["epoch", "loss"])
        rows.append(
            (
                "training",
                f"{steps.height} steps over {steps['epoch'].n_unique()} epochs; "
                f"loss {steps['loss'][0]:.4f} → {steps['loss'][-1]:.4f}",
            )
        )
    if run.samples.exists():
        rows.append(("scoring", fidelity(run, meta)))
        v = pl.read_parquet(run.samples, columns=["value"])["value"]
        helped, hurt = (v > 0).sum(), (v < 0).sum()
        rows.append(("values", f"{helped} samples helped, {hurt} hurt (lowered / raised the validation loss)"))
    if run.plan.exists():
        rows.append(("curation", curation_sentence(run, json.loads(run.plan.read_text()))))
    report = f"{where}/{run.report.relative_to(run.root).as_posix()}"
    rows.append(("report", report if run.report.exists() else "not written"))
    return rows


def top_rows(run: RunDir, n: int = TOP) -> list[dict]:
    """The ``n`` most helpful and ``n`` most harmful samples (report.top_samples rows); none before scoring."""
    return top_samples(run, n) if run.samples.exists() else []


def _grid(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True, min_width=8)
    grid.add_column(overflow="fold")
    for field, text in rows:
        grid.add_row(field, escape(text))
    return grid


def render(run: RunDir, location: str | None = None) -> Panel:
    """The summary as a rich panel (the CLI prints it after ``dvemb run``): the rows, the top samples, and
    where report.md is last (``location``: see summary_rows)."""
    rows = summary_rows(run, location)
    parts: list = [_grid(rows[:-1])]
    top = top_rows(run)
    if top:
        parts.append(_top_table(top))
    parts.append(_grid(rows[-1:]))
    return Panel(Group(*parts), title="dvemb run summary", title_align="left", expand=False)


def _top_table(top: list[dict]) -> Table:
    """The most helpful / most harmful samples (report.top_samples rows) as a rich table."""
    has_label = any(r["label"] is not None for r in top)
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    t.add_column("")
    t.add_column("sample_id", justify="right")
    if has_label:
        t.add_column("label", justify="right")
    t.add_column("value", justify="right")
    for r in top:
        label = [str(r["label"])] if has_label else []
        name = f"{'most helpful' if r['group'] == 'most valuable' else 'most harmful'} {r['rank']}"
        t.add_row(name, str(r["sample_id"]), *label, r["value"])
    return t


def query_summary(run: RunDir, folder: Path, location: str) -> Panel:
    """What ``dvemb query`` prints: the query (rows, mode), the training samples that helped and hurt it
    most, and where its files are (``location``: the run as the user named it)."""
    meta = json.loads((folder / "query.json").read_text())
    where = f"{location.rstrip('/')}/{folder.relative_to(run.root).as_posix()}"
    rows = [
        ("query", f"{folder.name}: {meta['rows']} rows from {meta['source']}"),
        ("scored", f"score.mode {meta['score_mode']}, checkpoints {meta['checkpoints']}"),
    ]
    top = top_samples(run, TOP, folder / "samples.parquet")
    files = [("files", f"{where}/occurrences.parquet, samples.parquet")]
    return Panel(
        Group(_grid(rows), _top_table(top), _grid(files)), title="dvemb query", title_align="left", expand=False
    )


def summary_markdown(run: RunDir) -> str:
    """The same summary as Markdown (e.g. for a Prefect markdown artifact)."""
    lines = ["| | |", "|---|---|", *(f"| {f} | {t.replace('|', '/')} |" for f, t in summary_rows(run))]
    top = top_rows(run)
    if top:
        lines += ["", "| | sample_id | label | value |", "|---|---:|---:|---:|"]
        for r in top:
            label = "" if r["label"] is None else r["label"]
            lines.append(f"| {r['group']} #{r['rank']} | {r['sample_id']} | {label} | {r['value']} |")
    return "\n".join(lines) + "\n"
