"""``dvemb query``: a new validation table scored against a finished run, beside the run's own scores.

Independent checks: the run's own table gives the run's own scores to the bit; first-order scores are linear
in the validation objective, so the row-weighted sum of two queries over a split of the validation table is
the whole table's score (every mode, SGD and AdamW with the exact removal step); embedding and direct modes
agree on a query (SGD and Adam-aware embeddings).
"""

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir

FP64 = ["train.precision=64-true", "capture.dtype=float64", "embed.dtype=float64"]
TINY = ["train.epochs=2", "data.subset=200", "embed.segments=2", "embed.write=always", *FP64]
ADAMW = ["train.optimizer=adamw", "train.lr=0.01", "capture.kind=rowwise"]
MOMENTUM = ["train.momentum=0.9", "train.lr=0.05"]
runner = CliRunner()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line(res) -> str:
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def runs(cli_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("query")
    return {
        "sgd": cli_run(root / "sgd", TINY),
        "adamw": cli_run(root / "adamw", TINY + ADAMW),
        "momentum": cli_run(root / "momentum", TINY + MOMENTUM),  # the default Gaussian store
    }


def query(run: Path, table: Path, name: str, *sets: str):
    res = cli("query", run, table, "--name", name, *(a for s in sets for a in ("--set", s)))
    assert res.exit_code == 0, res.output
    return pl.read_parquet(run / "queries" / name / "occurrences.parquet")


def split(run: Path, tmp: Path) -> tuple[Path, Path, int, int]:
    """The run's validation table cut in two Parquet files (a third / the rest)."""
    table = pq.read_table(run / "data" / "val.parquet")
    k = table.num_rows // 3
    paths = tmp / "part-a.parquet", tmp / "part-b.parquet"
    pq.write_table(table.slice(0, k), paths[0])
    pq.write_table(table.slice(k), paths[1])
    return *paths, k, table.num_rows - k


def test_the_runs_own_table_gives_the_runs_own_scores(runs):
    run = runs["sgd"]
    before = {p: p.read_bytes() for p in (run / "scores").iterdir()}
    res = cli("query", run, run / "data" / "val.parquet", "--name", "own")
    assert res.exit_code == 0, res.output
    assert "most helpful 1" in res.output and "most harmful 1" in res.output
    folder = run / "queries" / "own"
    for name in ("occurrences", "samples"):
        assert pl.read_parquet(folder / f"{name}.parquet").equals(pl.read_parquet(run / "scores" / f"{name}.parquet"))
    assert {p: p.read_bytes() for p in (run / "scores").iterdir()} == before  # the run's own scores untouched
    res = cli("status", run)
    assert res.exit_code == 0 and "damaged" not in res.output, res.output  # the query's files are in the manifest


@pytest.mark.parametrize(
    "kind, sets",
    [("sgd", ["score.mode=exact"]), ("sgd", ["score.mode=direct"]), ("sgd", ["score.mode=embedding"]),
     ("adamw", ["score.mode=exact"]), ("adamw", ["score.mode=direct"]), ("adamw", ["score.mode=embedding"]),
     ("momentum", ["score.mode=embedding"])],
)  # fmt: skip
def test_scores_are_linear_in_the_validation_rows(runs, tmp_path, kind, sets):
    """n_a s_a + n_b s_b = (n_a + n_b) s for every occurrence at every checkpoint (1e-9 of the largest score)."""
    run = runs[kind]
    a, b, n_a, n_b = split(run, tmp_path)
    tag = sets[0].split("=")[1]
    whole = query(run, run / "data" / "val.parquet", f"whole-{tag}", *sets)["score"].to_numpy()
    s_a = query(run, a, f"a-{tag}", *sets)["score"].to_numpy()
    s_b = query(run, b, f"b-{tag}", *sets)["score"].to_numpy()
    combined = (n_a * s_a + n_b * s_b) / (n_a + n_b)
    assert abs(combined - whole).max() <= 1e-9 * abs(whole).max()
    assert abs(s_a - whole).max() > 1e-3 * abs(whole).max()  # the parts are different queries


@pytest.mark.parametrize("kind", ["sgd", "adamw", "momentum"])
def test_embedding_and_direct_modes_answer_a_query_alike(runs, tmp_path, kind):
    """From the embeddings (AdamW: the (theta, m, v) propagators; momentum: (theta, b)) as from the gradient
    store, to 1e-9."""
    from dvemb.store.rundir import load_tensors

    run = runs[kind]
    prop = load_tensors(RunDir(run).propagator(0))
    width = {"sgd": 0, "adamw": 3, "momentum": 2}[kind]  # state blocks per stored coordinate (0: the SGD layout)
    assert all(k.startswith("Q.") for k in prop) if width else all(not k.startswith("Q.") for k in prop)
    if width:
        dims = {n: g.shape[1] for n, g in read_segment(RunDir(run).grads(0), kind="grads")[0].grads.items()}
        assert {k[2:]: v.shape[0] for k, v in prop.items()} == {n: width * d for n, d in dims.items()}
    a, _, _, _ = split(run, tmp_path)
    emb = query(run, a, "pair-embedding", "score.mode=embedding")
    direct = query(run, a, "pair-direct", "score.mode=direct")
    assert emb.select("sample_id", "step", "checkpoint").equals(direct.select("sample_id", "step", "checkpoint"))
    d = (emb["score"] - direct["score"]).abs().max()
    assert d <= 1e-9 * direct["score"].abs().max()


def test_bad_tables_are_named_and_nothing_is_written(runs, tmp_path):
    run = runs["sgd"]
    table = pl.read_parquet(run / "data" / "val.parquet")
    bad_label = pl.when(pl.int_range(pl.len()) == 4).then(12).otherwise(pl.col("label")).alias("label")
    cases = {
        "no-label": (table.drop("label"), "missing required column 'label'"),
        "narrow": (
            table.with_columns(pl.col("x").arr.to_list().list.head(63)),
            "column 'x' has 63 features per row; the run's model",
        ),
        "label": (table.with_columns(bad_label), "row 4 (sample_id"),
    }
    for name, (df, message) in cases.items():
        path = tmp_path / f"{name}.parquet"
        df.write_parquet(path)
        res = cli("query", run, path)
        assert res.exit_code == 2 and message in one_line(res) and str(path) in one_line(res), res.output
        assert "Traceback" not in res.output
        assert not (run / "queries" / name).exists()
    missing = cli("query", run, tmp_path / "nowhere.parquet")
    assert missing.exit_code == 2 and "no such Parquet file" in one_line(missing)


def test_an_existing_query_is_kept_unless_forced(runs, tmp_path):
    run = runs["sgd"]
    a, b, _, _ = split(run, tmp_path)
    first = query(run, a, "slice")
    res = cli("query", run, b, "--name", "slice")
    assert res.exit_code == 2 and "a query named 'slice' exists; pass --force" in one_line(res), res.output
    assert pl.read_parquet(run / "queries" / "slice" / "occurrences.parquet").equals(first)
    res = cli("query", run, b, "--name", "slice", "--force")
    assert res.exit_code == 0, res.output
    assert not pl.read_parquet(run / "queries" / "slice" / "occurrences.parquet").equals(first)
    assert RunDir(run).meta()["status"] != "failed"
    res = cli("query", run, a, "--name", "../escape")
    assert res.exit_code == 2 and "query name '../escape'" in one_line(res)


def test_an_adamw_runs_embeddings_answer_queries_without_the_gradient_store(runs, tmp_path):
    """Once `dvemb gc` has dropped an AdamW run's gradients, its Adam-aware embeddings still answer a new query,
    with the direct mode's numbers from before the drop (1e-9)."""
    import shutil

    run = shutil.copytree(runs["adamw"], tmp_path / "run")
    a, _, _, _ = split(run, tmp_path)
    direct = query(run, a, "before", "score.mode=direct")
    res = cli("gc", run, "--drop-grads")
    assert res.exit_code == 0, res.output
    assert not list((run / "grads").glob("seg-*.arrow"))
    after = query(run, a, "after", "score.mode=embedding")
    assert after.select("sample_id", "step", "checkpoint").equals(direct.select("sample_id", "step", "checkpoint"))
    assert (after["score"] - direct["score"]).abs().max() <= 1e-9 * direct["score"].abs().max()
    res = cli("query", run, a, "--name", "gone", "--set", "score.mode=direct")
    assert res.exit_code == 2 and "dropped by `dvemb gc`" in one_line(res), res.output


def test_state_aware_runs_scored_with_a_weak_curvature_model_are_told_the_measured_one(runs):
    """AdamW / momentum runs in embedding or direct mode with the empirical Fisher or per-layer blocks get a warning
    naming embed.curvature=hessian or fisher and embed.blocks=model (measured far more faithful: docs/RESULTS.md);
    plain SGD and the recommended settings get none."""
    from dvemb.embed.recorded_state import curvature_advice

    for kind in ("adamw", "momentum"):
        run = RunDir(runs[kind])
        for curvature, blocks in (("empirical", "layer"), ("empirical", "model"), ("fisher", "layer")):
            advice = curvature_advice(run, curvature, blocks)
            assert advice and "embed.blocks=model" in advice, advice
            assert "embed.curvature=hessian" in advice and "fisher" in advice, advice
        assert curvature_advice(run, "fisher", "model") is None
        assert curvature_advice(run, "hessian", "model") is None
    assert curvature_advice(RunDir(runs["sgd"]), "empirical", "layer") is None
