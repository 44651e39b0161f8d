"""What `dvemb run` prints: one line per stage, an end summary read from the run directory (mode, counts, top
samples, report path), and no duplicated framework logging."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.progress import quiet_frameworks
from dvemb.store.rundir import RunDir
from dvemb.summary import fidelity, summary_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.epochs=2", "--set", "data.subset=400", "--set", "embed.segments=2"]
GPU_LINE = "GPU available:"  # Lightning's INFO line at Trainer construction


def flat(text: str) -> str:
    """The output without whitespace and panel borders (rich folds long values over lines)."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary") / "run"
    res = CliRunner().invoke(app, ["run", "configs/digits_mlp.yaml", "--engine", "local", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    return RunDir(out), res.output


def test_summary_names_mode_counts_top_samples_and_report(digits):
    run, output = digits
    text = flat(output)
    assert "dvembrunsummary" in text
    assert flat("exact first-order leave-one-out through the recorded optimizer (sgd") in text
    plan = json.loads(run.plan.read_text())
    assert plan["n_train"] == 400 and plan["n_dropped"] == plan["n_train"] - plan["n_kept"]
    assert flat(f"kept {plan['n_kept']} of {plan['n_train']} training rows, dropped {plan['n_dropped']}") in text
    assert flat("value < 0, i.e. their steps raised the validation loss") in text
    # the top samples, computed here from scores/samples.parquet (+ labels), with their values as printed
    samples = pl.read_parquet(run.samples).join(
        pl.read_parquet(run.data("train"), columns=["sample_id", "label"]), on="sample_id"
    )
    v = samples["value"]
    assert flat(f"{(v > 0).sum()} samples helped, {(v < 0).sum()} hurt") in text
    best = samples.sort("value", descending=True).head(3)
    worst = samples.sort("value").head(3)
    for group, rows in (("mosthelpful", best), ("mostharmful", worst)):
        for rank, r in enumerate(rows.to_dicts(), 1):
            assert f"{group}{rank}{r['sample_id']}{r['label']}{r['value']:+.3e}" in text, (group, rank, r)
    assert flat(f"report {run.report}") in text and run.report.exists()
    # every stage has its line (embed: one line for the segments that wrote nothing, exact mode) and its time
    for line in ("✓ train: ", "✓ embed: 2 of 2 segment(s) wrote nothing", "✓ score: ", "✓ curate: kept"):
        assert line in output, line
    timings = run.meta()["timings"]
    assert set(timings) == {"train", "embed", "score", "curate"} and all(t >= 0 for t in timings.values())
    assert flat(f"train {timings['train']:.1f} s") in text
    assert output.count("dvemb run summary") == 1


def test_report_says_what_retraining_is_expected_to_do(digits):
    run, _ = digits
    report = run.report.read_text()
    assert "**retraining on the curated table**" in report
    assert "lowered the clean test loss from 0.796 to 0.618" in report  # docs/CURATION.md, embedding mode
    link = re.search(r"\[docs/CURATION.md\]\(([^)]+)\)", report).group(1)
    target = Path(link.removeprefix("file://")) if link.startswith("file://") else run.root / link
    assert target.resolve() == (ROOT / "docs" / "CURATION.md").resolve()
    assert "no measurement on clean data" in report  # no label was flipped in this run


def test_summary_markdown_is_the_same_content(digits):
    run, _ = digits
    md = summary_markdown(run)
    assert "| scoring | exact: exact first-order leave-one-out" in md
    assert md.count("| most valuable #") == 3 and md.count("| most harmful #") == 3
    assert f"| report | {run.report} |" in md


def test_no_duplicated_lightning_lines_without_verbose(digits):
    _, output = digits
    assert GPU_LINE not in output  # Lightning's INFO lines: only with -v
    assert "lightning.pytorch.utilities.rank_zero" not in output
    assert "LeafSpec" not in output  # the known harmless pytree deprecation warning is filtered


def test_lightning_logs_once_through_the_root_handler():
    """After quiet_frameworks, a Lightning INFO record reaches the console once (the root handler's), and only
    when the root handler shows INFO (-v)."""
    quiet_frameworks()
    for name in ("lightning", "lightning.pytorch"):
        logger = logging.getLogger(name)
        assert logger.propagate and not [h for h in logger.handlers if type(h) is logging.StreamHandler]
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger()
    h = Collect(logging.WARNING)
    root.addHandler(h)
    try:
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("GPU available: False, used: False")
        assert seen == []
        h.setLevel(logging.INFO)
        rank_zero.info("GPU available: False, used: False")
        assert seen == ["GPU available: False, used: False"]
    finally:
        root.removeHandler(h)


def test_verbose_cli_prints_each_lightning_line_once(tmp_path):
    """The real console (a fresh process, Lightning imported there): with -v, 'GPU available' exactly once."""
    code = "import sys; from dvemb.cli import app; sys.argv[0] = 'dvemb'; app()"
    args = ["-v", "run", "configs/digits_mlp.yaml", "--engine", "local", "--out", str(tmp_path / "run"), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    res = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count(GPU_LINE) == 1, out[-3000:]
    assert out.count("✓ score: ") == 1  # a stage line once (the display), not again from the root handler
    assert "dvemb run summary" in out


def test_fidelity_names_the_curvature_model_outside_exact_mode(digits):
    run, _ = digits
    meta = run.meta()
    meta["config"]["score"]["mode"] = "embedding"
    text = fidelity(run, meta)
    assert text.startswith("embedding: approximate") and "curvature model (empirical curvature, layer blocks" in text
    assert text.endswith("from the data value embeddings")
    meta["config"]["score"]["mode"] = "direct"
    assert fidelity(run, meta).endswith("from the stored gradients")
