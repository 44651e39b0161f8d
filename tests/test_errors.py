"""Bad input through the real CLI (``--engine local``): exit code 2, one line naming the field / file /
row / step / layer, no traceback, nothing half-written; non-finite numbers never reach the outputs;
run directories are never overwritten or deleted unless they are dvemb runs and --force is given."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from dvemb.checks import diverged_at, finite, finite_frame
from dvemb.cli import app
from dvemb.data.tables import feature_table, load_source
from dvemb.errors import NonFiniteError
from dvemb.store.rundir import RunDir, load_tensors, save_tensors

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_mlp.yaml"
TINY = ["--set", "train.epochs=1", "--set", "data.subset=200", "--set", "embed.segments=2"]  # 7 steps
TINY += ["--set", "embed.write=always"]  # embeddings and propagators too (exact mode alone writes none)
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def run_args(out: Path, *sets: str) -> list[str]:
    return ["run", CONFIG, "--out", out, "--engine", "local", *TINY, *[a for s in sets for a in ("--set", s)]]


def assert_clean_error(res, *needles: str, code: int = 2) -> None:
    """Exit ``code``, one 'error:' line holding every needle, no traceback."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    out = " ".join(res.output.split())  # rich may wrap long lines
    assert "Traceback" not in out and out.count("error:") == 1, res.output
    for n in needles:
        assert " ".join(str(n).split()) in out, f"{n!r} not in {res.output!r}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A complete tiny run: 7 steps, 2 segments, boundaries [0, 4, 7]."""
    out = tmp_path_factory.mktemp("runs") / "base"
    res = cli(*run_args(out))
    assert res.exit_code == 0, res.output
    assert RunDir(out).boundaries == [0, 4, 7]
    return out


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """User Parquet tables: digits train/val, an empty table, a val table of width 32."""
    d = tmp_path_factory.mktemp("tables")
    t = load_source("digits")
    pq.write_table(t["train"], d / "train.parquet")
    pq.write_table(t["val"], d / "val.parquet")
    pq.write_table(t["train"].slice(0, 0), d / "empty.parquet")
    pq.write_table(feature_table(np.zeros((20, 32)), np.zeros(20, int), np.arange(5000, 5020)), d / "val32.parquet")
    return d


def copy_of(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    return out


def parquet_sets(tables: Path, train: str, val: str | None) -> list[str]:
    sets = ["data.source=parquet", "data.n_classes=10", f"data.train_path={tables / train}"]
    return sets + ([f"data.val_path={tables / val}"] if val else [])


# --- the catalogue: each case -> its one-line message (docs/RELIABILITY.md) -----------------------------
# Each builder gets (tmp_path, base run, tables dir) and returns the CLI arguments and the needles.
Case = Callable[[Path, Path, Path], tuple[list, list[str]]]


def empty_training_table(tmp, base, tables):
    return run_args(tmp / "r", *parquet_sets(tables, "empty.parquet", "val.parquet")), [
        "train table",
        "empty.parquet",
        "empty (0 rows)",
    ]


def val_of_another_width(tmp, base, tables):
    return run_args(tmp / "r", *parquet_sets(tables, "train.parquet", "val32.parquet")), [
        "val32.parquet",
        "feature width 32",
        "training table has 64",
    ]


def parquet_without_val_path(tmp, base, tables):
    return run_args(tmp / "r", *parquet_sets(tables, "train.parquet", None)), ["data.val_path"]


def malformed_yaml(tmp, base, tables):
    (tmp / "bad.yaml").write_text("name: x\ndata: [1, 2\n")
    return ["run", tmp / "bad.yaml", "--engine", "local", "--out", tmp / "r"], ["bad.yaml", "line 3", "not valid YAML"]


def python_tag(tmp, base, tables):
    (tmp / "py.yaml").write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    return ["run", tmp / "py.yaml", "--engine", "local", "--out", tmp / "r"], [
        "py.yaml",
        "line 1",
        "!!python/object/apply:os.system refused",
    ]


def gpt_on_digits(tmp, base, tables):
    return run_args(tmp / "r", "task=gpt"), ["task 'gpt'", "text"]


def override_not_yaml(tmp, base, tables):
    return run_args(tmp / "r", "data.batch_size=[1"), ["override 'data.batch_size=[1'", "not valid YAML"]


def run_name_leaving_runs(tmp, base, tables):
    cfg = tmp / "victim.yaml"
    cfg.write_text(Path(CONFIG).read_text().replace("name: digits_mlp", "name: ../victim"))
    return ["run", cfg, "--engine", "local", "--force"], ["name '../victim'", "plain folder name"]


def embed_segment_99(tmp, base, tables):
    return ["embed", base, "--segment", "99"], ["--segment 99", "segments 0..1"]


def corrupted_checkpoint(tmp, base, tables):
    run = copy_of(base, tmp)
    (run / "checkpoints" / "step-000004.safetensors").write_bytes(b"garbage" * 10)
    return ["score", run], ["checkpoints/step-000004.safetensors", "damaged"]


def corrupted_checkpoint_without_manifest(tmp, base, tables):
    run = copy_of(base, tmp)
    (run / "manifest.json").unlink()
    (run / "checkpoints" / "step-000004.safetensors").write_bytes(b"garbage" * 10)
    return ["score", run], ["checkpoints/step-000004.safetensors", "unreadable safetensors"]


def corrupted_run_json(tmp, base, tables):
    run = copy_of(base, tmp)
    (run / "run.json").write_text('{"config": ')
    return ["score", run], ["run.json", "damaged", "not valid JSON"]


def grads_cut_in_half_score(tmp, base, tables):
    run = copy_of(base, tmp)
    g = run / "grads" / "seg-0000-rank-0.arrow"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    return ["score", run], ["grads/seg-0000-rank-0.arrow", "damaged"]


def grads_cut_in_half_status(tmp, base, tables):
    run = copy_of(base, tmp)
    g = run / "grads" / "seg-0001-rank-0.arrow"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    return ["status", run], ["train   damaged", "grads/seg-0001-rank-0.arrow"]


def plain_value_error(tmp, base, tables):
    return ["curate", copy_of(base, tmp), "--set", "curate.filter_by=nope"], [
        "ValueError",
        "'nope'",
        "re-run with --debug for the traceback",
    ]


def not_a_run_directory(tmp, base, tables):
    (tmp / "plain").mkdir()
    return ["score", tmp / "plain"], ["no run.json"]


CASES: list[Case] = [
    empty_training_table,
    val_of_another_width,
    parquet_without_val_path,
    malformed_yaml,
    python_tag,
    gpt_on_digits,
    override_not_yaml,
    run_name_leaving_runs,
    embed_segment_99,
    corrupted_checkpoint,
    corrupted_checkpoint_without_manifest,
    corrupted_run_json,
    grads_cut_in_half_score,
    grads_cut_in_half_status,
    plain_value_error,
    not_a_run_directory,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_is_one_clear_line(case, tmp_path, base, tables, monkeypatch):
    (tmp_path / "cwd" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")  # runs/<name> and ../victim stay inside tmp_path
    args, needles = case(tmp_path, base, tables)
    res = cli(*args)
    if case is grads_cut_in_half_status:  # status lists every stage, then the damaged file; exit 2
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert all(n in res.output for n in needles), res.output
        return
    assert_clean_error(res, *needles)
    # checks that can run before training leave nothing behind
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback_and_unexpected_errors_exit_1(base, tmp_path, monkeypatch):
    run = copy_of(base, tmp_path)
    res = cli("--debug", "curate", run, "--set", "curate.filter_by=nope")
    assert isinstance(res.exception, ValueError)  # propagated, with its traceback

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("dvemb.score.run.score", broken)
    assert_clean_error(cli("score", run), "RuntimeError: disk on fire", "--debug", code=1)


def test_status_of_a_run_that_never_trained(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.update_meta(status="preparing", config={"name": "r"})
    res = cli("status", run.root)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "status 'preparing'" in res.output and "train   not started" in res.output
    assert "training never started" in res.output


def test_more_segments_than_steps_are_clamped_and_recorded(tmp_path):
    res = cli(*run_args(tmp_path / "r", "embed.segments=500"))
    assert res.exit_code == 0, res.output
    assert "embed.segments=500 but training has 7 steps: using 7 segments" in " ".join(res.output.split())
    meta = RunDir(tmp_path / "r").meta()
    assert meta["boundaries"] == list(range(8))
    assert meta["config"]["embed"]["segments"] == 7 and meta["embed_segments_requested"] == 500
    assert pl.read_parquet(tmp_path / "r" / "scores" / "occurrences.parquet")["checkpoint"].n_unique() == 7


# --- non-finite numbers ---------------------------------------------------------------------------------
def test_divergent_training_stops_before_any_score(tmp_path):
    res = cli(*run_args(tmp_path / "r", "train.lr=1e6"))
    assert_clean_error(res, "training diverged at step 1", "lr 1e+06", "train.lr")
    run = RunDir(tmp_path / "r")
    assert run.meta()["status"] == "diverged"
    assert not list(run.root.glob("embeddings/*")) and not run.occurrences.exists()


def test_non_finite_propagator_writes_no_scores(base, tmp_path):
    run = RunDir(copy_of(base, tmp_path))
    shutil.rmtree(run.root / "scores")
    state = load_tensors(run.propagator(1))
    name = next(k for k in state if k.startswith("M."))
    state[name] = state[name].clone()
    state[name].view(-1)[3] = float("nan")
    save_tensors(run.propagator(1), state)  # through dvemb.store.atomic: the manifest follows
    assert_clean_error(
        cli("score", run.root, "--set", "score.mode=embedding"),
        "scores: column 'score' is nan",
        "step",
        "sample_id",
        "nothing was written",
    )
    assert not (run.root / "scores").exists() or not list((run.root / "scores").iterdir())


@pytest.mark.parametrize(
    "values, kwargs, message",
    [
        (
            torch.tensor([[1.0, 2.0], [3.0, float("nan")]]),
            {"step": 7, "layer": "fc1", "sample_ids": [40, 41]},
            r"x: non-finite value nan at step 7, layer 'fc1', sample_id 41 \(1 of 4 values\)",
        ),
        ({"fc2": np.array([np.inf])}, {"step": 3}, r"at step 3, layer 'fc2', index \(0,\)"),
        (np.float64("-inf"), {}, "non-finite value -inf at a scalar"),
    ],
)
def test_finite_names_where(values, kwargs, message):
    with pytest.raises(NonFiniteError, match=message):
        finite(values, "x", **kwargs)
    finite(torch.ones(3), "x")  # finite: silent
    finite(torch.arange(3), "x")  # integers: nothing to check


def test_finite_frame_names_column_row_step_and_sample():
    df = pl.DataFrame({"sample_id": [5, 6, 7], "step": [0, 0, 1], "score": [0.5, 1.0, float("inf")]})
    with pytest.raises(NonFiniteError, match=r"column 'score' is inf at row 2 \(step 1, sample_id 7\); 1 of 3"):
        finite_frame(df, "scores")
    finite_frame(df.head(2), "scores")


def test_divergence_rule():
    assert diverged_at(np.array([2.3, 2.1, 1.9])) is None
    assert diverged_at(np.array([2.3, 2.1, float("nan")]))[0] == 2
    assert diverged_at(np.array([2.3, 2.1, float("inf")]), lr=np.array([0.1, 0.1, 0.0])) is None  # AMP skip
    assert diverged_at(np.array([2.3, 2299.0, 2301.0]))[0] == 2  # 1000 x the first loss
    assert diverged_at(np.array([1e-3, 999.0])) is None  # tiny start: the floor is 1000 x 1


# --- paths ----------------------------------------------------------------------------------------------
def test_out_through_a_missing_folder_cannot_overwrite_a_run(base, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    res = cli(*run_args(base.parent / "missing_dir" / ".." / base.name))
    assert_clean_error(res, str(base), "pass --force")
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()} == before
    assert not (base.parent / "missing_dir").exists()


def test_force_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    assert_clean_error(cli(*run_args(victim), "--force"), str(victim), "not a dvemb run directory (no run.json)")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_run_stopped_before_training_does_not_block_a_rerun(tmp_path, tables):
    out = tmp_path / "r"
    run = RunDir(out)
    run.create()  # what a crash during data preparation leaves: run.json + data/, no checkpoint, no gradient
    run.update_meta(status="preparing")
    (out / "data").mkdir()
    pq.write_table(load_source("digits")["train"], out / "data" / "train.parquet")
    res = cli(*run_args(out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["status"] == "trained"


def test_logging_after_an_in_process_invocation_reaches_the_current_stderr(capsys):
    """The CLI's log handler follows sys.stderr: CliRunner closes the stream it lent, and a record logged after
    the invocation (a notebook or test calling dvemb's functions next) goes to today's stderr, not the closed one."""
    import logging

    from typer.testing import CliRunner

    from dvemb.cli import app

    assert CliRunner().invoke(app, ["status", "/nonexistent-run"]).exit_code == 2
    logging.getLogger("dvemb.test").warning("after the invocation")
    err = capsys.readouterr().err
    assert "after the invocation" in err and "Logging error" not in err
