"""Curation: value table, phases, filter / reorder / selection policies, the plan sampler, retraining."""

import json

import numpy as np
import polars as pl
import pytest

from dvemb.config import CurateConfig, RunConfig
from dvemb.curate.detect import auroc, detection_metrics
from dvemb.curate.filter import by_value, keep_ids
from dvemb.curate.plan import SelectionPlan, Window, plan_windows
from dvemb.curate.run import build_plan, curated_table
from dvemb.curate.selection import PlanSampler, selection_table, top_k
from dvemb.data.datamodule import PlannedBatchSampler
from dvemb.score.values import Phases, detect_phases, phases_for, step_curve, value_table


def occ_table(rows, checkpoint=None):
    df = pl.DataFrame(rows, schema=["sample_id", "step", "epoch", "score"], orient="row")
    return df if checkpoint is None else df.with_columns(pl.lit(checkpoint, dtype=pl.Int64).alias("checkpoint"))


# --------------------------------------------------------------------------- value table


def test_value_table_sums_by_epoch_phase_and_checkpoint():
    final = occ_table([(1, 0, 0, 1.0), (2, 0, 0, -2.0), (1, 2, 1, 0.5), (2, 3, 1, 0.25), (3, 3, 1, 4.0)], 4)
    inter = occ_table([(1, 0, 0, 10.0), (2, 0, 0, -20.0)], 2)
    ph = Phases(total_steps=4, early_end=1, late_start=3, method="config")
    t = value_table(pl.concat([inter, final]), ph)
    assert t["sample_id"].to_list() == [1, 2, 3]
    assert t["value"].to_list() == [1.5, -1.75, 4.0]
    assert t["n_occurrences"].to_list() == [2, 2, 1]
    assert t["value_epoch_0"].to_list() == [1.0, -2.0, 0.0]
    assert t["value_epoch_1"].to_list() == [0.5, 0.25, 4.0]
    assert t["value_early"].to_list() == [1.0, -2.0, 0.0]
    assert t["value_middle"].to_list() == [0.5, 0.0, 0.0]
    assert t["value_late"].to_list() == [0.0, 0.25, 4.0]
    assert t["n_late"].to_list() == [0, 1, 1]
    # the value at the intermediate checkpoint: occurrences before it, scored at it; none -> 0
    assert t["value_ckpt_2"].to_list() == [10.0, -20.0, 0.0]
    assert "value_ckpt_4" not in t.columns
    np.testing.assert_allclose(t["value_early"] + t["value_middle"] + t["value_late"], t["value"])


def test_value_table_with_empty_phases():
    occ = occ_table([(5, 0, 0, 1.0), (6, 1, 0, 2.0)], 2)
    t = value_table(occ, Phases(total_steps=2, early_end=0, late_start=2, method="config"))
    assert t["value_early"].to_list() == [0.0, 0.0] and t["value_late"].to_list() == [0.0, 0.0]
    assert t["value_middle"].to_list() == [1.0, 2.0]


def test_detect_phases_finds_the_basin():
    t = np.arange(100)
    curve = np.exp(-t / 8.0) + np.exp((t - 99) / 8.0) + 1e-3  # high early and late, low in between
    early, late = detect_phases(curve, threshold=0.25, smooth=1)
    assert 5 < early < 40 and 60 < late < 95
    assert detect_phases(np.ones(50)) == (0, 50)  # flat: all basin
    assert detect_phases(np.zeros(0)) == (0, 0)
    assert detect_phases(np.zeros(7)) == (0, 7)
    e, l2 = detect_phases(np.linspace(1.0, 100.0, 60), smooth=1)  # rising: no early phase
    assert e == 0 and 0 < l2 < 60


def test_phases_from_occurrences_and_config():
    occ = occ_table([(0, s, 0, v) for s, v in enumerate([5.0, 4.0, 0.01, 0.01, 0.01, 0.01, 3.0, 6.0])], 8)
    assert step_curve(occ, 8)[0] == 5.0
    ph = phases_for(occ, 8, None, threshold=0.25, smooth=1)
    assert (ph.early_end, ph.late_start, ph.method) == (2, 6, "detected")
    ph = phases_for(occ, 8, [3, 100])  # given, clipped to the run
    assert (ph.early_end, ph.late_start, ph.method) == (3, 8, "config")
    ph = phases_for(occ, 8, [6, 2])  # late before early: middle collapses
    assert (ph.early_end, ph.late_start) == (6, 6)
    with pytest.raises(ValueError):
        Phases(total_steps=4, early_end=3, late_start=2)


# --------------------------------------------------------------------------- filter / reorder


def samples_table(values):
    return pl.DataFrame({"sample_id": list(range(len(values))), "value": values})


def test_filter_policies_with_ties_and_all_negative():
    s = samples_table([0.5, -1.0, 0.0, -1.0, 2.0, -1.0])
    assert keep_ids(s, "negative")["sample_id"].to_list() == [0, 2, 4]
    assert keep_ids(s, "none").height == 6
    # quantile: exact count even among ties; ties dropped lowest sample_id first
    assert sorted(keep_ids(s, "quantile", 1 / 3)["sample_id"].to_list()) == [0, 2, 4, 5]
    assert keep_ids(s, "quantile", 0.0).height == 6
    neg = samples_table([-3.0, -1.0, -2.0])
    assert keep_ids(neg, "negative").height == 0
    assert keep_ids(neg, "quantile", 0.34)["sample_id"].to_list() == [2, 1]
    with pytest.raises(ValueError, match="filter_by"):
        keep_ids(s, "negative", by="nope")
    with pytest.raises(ValueError):
        keep_ids(s, "bogus")


def test_curated_table_orders_by_value_and_keeps_unscored_rows():
    train = pl.DataFrame({"sample_id": [10, 11, 12, 13, 14], "label": [0, 1, 0, 1, 0]})
    samples = pl.DataFrame({"sample_id": [10, 11, 12, 13], "value": [1.0, -1.0, 1.0, 3.0]})
    cur = curated_table(train, samples, CurateConfig(drop="negative"))
    assert cur["sample_id"].to_list() == [13, 10, 12, 14]  # ties by id; unscored 14 has value 0
    assert cur["prior_value"].to_list() == [3.0, 1.0, 1.0, 0.0]
    assert cur["label"].to_list() == [1, 0, 0, 0]
    assert by_value(cur)["sample_id"].to_list() == [13, 10, 12, 14]
    empty = curated_table(train, samples.with_columns(pl.lit(-1.0).alias("value")), CurateConfig(drop="negative"))
    assert empty["sample_id"].to_list() == [14]


# --------------------------------------------------------------------------- plans


def test_selection_budget_shrinks_windows_toward_their_outer_ends():
    ph = Phases(total_steps=200, early_end=20, late_start=100)  # early 20 + late 100 = 120 selection steps
    w = plan_windows(ph, reorder="none", select="online", select_phases=["early", "late"], budget=0.3)
    assert [(x.start, x.stop, x.phase) for x in w] == [(0, 10, "early"), (150, 200, "late")]  # 60 = 10 + 50
    w = plan_windows(ph, "none", "online", ["early", "late"], budget=0.7)  # 140 allowed >= 120: unchanged
    assert [(x.start, x.stop) for x in w] == [(0, 20), (100, 200)]
    w = plan_windows(ph, "none", "online", ["middle"], budget=0.1)  # middle [20, 100) keeps its centre
    assert [(x.start, x.stop) for x in w] == [(50, 70)]
    w = plan_windows(ph, "none", "online", ["early", "late"], budget=1 / 3)  # 66: 11 + 55 exactly, no rounding loss
    assert sum(x.stop - x.start for x in w) == 66 and w[-1].stop == 200
    empty = Phases(total_steps=200, early_end=0, late_start=200)
    assert plan_windows(empty, "none", "online", ["early", "late"], budget=0.2) == []
    # an early window trimmed by the budget stays selection; reorder never takes the remainder
    w = plan_windows(ph, "early", "online", ["early", "late"], budget=0.3)
    assert [x.mode for x in w] == ["online", "online"]


def test_plan_windows_follow_the_phases():
    ph = Phases(total_steps=10, early_end=3, late_start=7)
    w = plan_windows(ph, reorder="early", select="online", select_phases=["late"])
    assert [(x.start, x.stop, x.mode, x.phase) for x in w] == [(0, 3, "ordered", "early"), (7, 10, "online", "late")]
    w = plan_windows(ph, reorder="early", select="prior", select_phases=["early", "late"])
    assert [x.mode for x in w] == ["prior", "prior"]  # selection wins over reordering
    empty = Phases(total_steps=10, early_end=0, late_start=10)
    assert plan_windows(empty, "early", "online", ["early", "late"]) == []
    plan = build_plan(ph, CurateConfig(select="online"), n_train=50, n_kept=40, source_run="r")
    back = SelectionPlan.model_validate_json(json.dumps(plan.model_dump(mode="json")))
    assert back == plan and back.n_dropped == 10 and back.uses == {"online"} and not back.stratify
    assert build_plan(ph, CurateConfig(select="online", select_stratify=True), 50, 40).stratify
    with pytest.raises(ValueError, match="overlap"):
        SelectionPlan(
            source_total_steps=10,
            windows=[Window(start=0, stop=5, mode="prior"), Window(start=4, stop=6, mode="online")],
        )


def test_step_modes_rescale_and_clip_a_plan_longer_than_the_run():
    plan = SelectionPlan(
        source_total_steps=100,
        windows=[Window(start=0, stop=20, mode="prior"), Window(start=80, stop=300, mode="online")],
    )
    m = plan.step_modes(10)
    assert m.tolist() == [2, 2, 0, 0, 0, 0, 0, 0, 3, 3]
    fixed = plan.model_copy(update={"rescale": False})
    assert fixed.step_modes(50).tolist() == [2] * 20 + [0] * 30  # the late window lies past the run


# --------------------------------------------------------------------------- sampler


def test_empty_plan_matches_the_planned_batch_sampler():
    s = PlanSampler(23, 5, None, epochs=2, seed=3)
    ref = PlannedBatchSampler(23, 5, seed=3)
    for e in range(2):
        assert [p.rows.tolist() for p in s.plan(e)] == [b.tolist() for b in ref.plan(e)]


def test_sampler_executes_a_plan_deterministically_and_records_it():
    n, b = 20, 4
    prior = np.array([float(i % 7) for i in range(n)])
    ids = np.arange(100, 100 + n)
    plan = SelectionPlan(
        source_total_steps=10,
        pool_factor=3,
        windows=[
            Window(start=0, stop=2, mode="ordered"),
            Window(start=2, stop=4, mode="prior"),
            Window(start=8, stop=10, mode="online"),
        ],
    )
    s1 = PlanSampler(n, b, plan, epochs=2, seed=1, prior=prior, sample_ids=ids)
    s2 = PlanSampler(n, b, plan, epochs=2, seed=1, prior=prior, sample_ids=ids)
    yields = []
    for e in range(2):
        s1.set_epoch(e)
        s2.set_epoch(e)
        a, c = list(s1), list(s2)
        assert a == c
        yields += a
    assert len(yields) == s1.total_steps == 10
    # ordered: the queue, most valuable first, ties by sample_id
    queue = np.lexsort((ids, -prior))
    assert yields[0] == queue[:4].tolist() and yields[1] == queue[4:8].tolist()
    # prior selection: the B best of the pool
    p = s1.plan(0)[2]
    assert len(p.pool) == 12 and len(p.rows) == 4
    assert prior[p.rows].min() >= np.sort(prior[p.pool])[-4]
    # online steps hand the pool to the trainee
    assert yields[8][0] == "online" and yields[8][1] == 8 and len(yields[8][2]) == 12 and yields[8][3] == 4
    rec = selection_table(s1)
    assert set(rec["mode"].unique()) == {"ordered", "prior", "uniform"}
    trained = rec.filter(pl.col("selected")).group_by("step").agg(pl.len()).sort("step")
    assert trained["step"].to_list() == list(range(8)) and set(trained["len"].to_list()) == {4}
    step2 = rec.filter(pl.col("step") == 2)
    assert step2.height == 12 and step2.filter(pl.col("selected"))["sample_id"].sort().to_list() == sorted(ids[p.rows])
    assert rec.equals(selection_table(s2))


def test_sampler_pool_larger_than_the_data_and_missing_prior():
    plan = SelectionPlan(source_total_steps=3, pool_factor=10, windows=[Window(start=0, stop=3, mode="prior")])
    s = PlanSampler(5, 2, plan, epochs=1, seed=0, prior=np.array([5.0, 4.0, 3.0, 2.0, 1.0]))
    steps = s.plan(0)
    assert [len(p.pool) for p in steps] == [5, 5, 5]  # pool clipped to the data
    assert [p.rows.tolist() for p in steps] == [[0, 1], [0, 1], [0]]  # last batch keeps its size
    with pytest.raises(ValueError, match="prior"):
        PlanSampler(5, 2, plan, epochs=1)


def test_top_k_ties_and_label_quotas():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 9.0, 8.0])
    ids = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    assert top_k(scores, ids, 4).tolist() == [6, 7, 0, 1]
    # ties: lower id first, whatever the position
    assert top_k(np.zeros(4), np.array([3, 1, 2, 0]), 2).tolist() == [3, 1]
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])  # 6 : 2 -> quotas 3 : 1 of k = 4
    assert top_k(scores, ids, 4, labels).tolist() == [6, 0, 1, 2]
    # equal remainders (k = 3 of 4 : 4): the smaller label gets the extra place
    half = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert top_k(scores, ids, 3, half).tolist() == [6, 0, 1]
    # every label keeps its share even when its scores are all below the others'
    low = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert np.bincount(low[top_k(scores, ids, 4, low)]).tolist() == [2, 2]
    # k = pool: everything, in rank order; k = 0: nothing
    assert sorted(top_k(scores, ids, 8, labels).tolist()) == list(range(8))
    assert top_k(scores, ids, 0, labels).tolist() == []


def test_stratified_prior_selection_keeps_the_label_mix():
    n, b = 40, 8
    labels = np.repeat([0, 1], n // 2)
    prior = np.where(labels == 1, 10.0, 0.0) + np.arange(n) * 1e-3  # class 1 always more valuable
    plan = SelectionPlan(source_total_steps=5, pool_factor=4, windows=[Window(start=0, stop=5, mode="prior")])
    plain = PlanSampler(n, b, plan, epochs=1, seed=2, prior=prior, labels=labels)
    strat = PlanSampler(n, b, plan.model_copy(update={"stratify": True}), epochs=1, seed=2, prior=prior, labels=labels)
    for p, q in zip(plain.plan(0), strat.plan(0), strict=True):
        assert np.array_equal(p.pool, q.pool)
        assert set(labels[p.rows].tolist()) == {1}  # unstratified: one class only
        pool_share = np.bincount(labels[q.pool], minlength=2) * len(q.rows) / len(q.pool)
        assert np.all(np.abs(np.bincount(labels[q.rows], minlength=2) - pool_share) < 1)
        for c in (0, 1):  # within a label, still the best
            kept, pool = prior[q.rows][labels[q.rows] == c], prior[q.pool][labels[q.pool] == c]
            assert np.array_equal(np.sort(kept), np.sort(pool)[len(pool) - len(kept) :])
    with pytest.raises(ValueError, match="class labels"):
        PlanSampler(n, b, plan.model_copy(update={"stratify": True}), epochs=1, prior=prior)


# --------------------------------------------------------------------------- metrics


def test_detection_metrics():
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    v = pl.DataFrame({"sample_id": [1, 2, 3, 4], "value": [-5.0, 1.0, -1.0, 2.0]})
    m = detection_metrics(v, np.array([1, 2]))
    assert m["k"] == 2 and m["precision_at_k"] == 0.5 and m["auroc"] == 0.75


# --------------------------------------------------------------------------- online selection + retraining


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dvemb.data.tables import feature_table
    from dvemb.store.rundir import RunDir

    root = tmp_path_factory.mktemp("tiny")
    run = RunDir(root)
    rng = np.random.default_rng(0)
    for split, n, off in (("train", 48, 0), ("val", 32, 1000), ("test", 32, 2000)):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        pl.from_arrow(feature_table(x, y, np.arange(off, off + n))).write_parquet(
            run.data(split).parent.mkdir(parents=True, exist_ok=True) or run.data(split)
        )
    run.update_meta(model_shape={"d_in": 6, "n_out": 2, "block_size": None})
    return run


def test_online_selection_retrain_is_deterministic_and_recorded(tiny_run, tmp_path):
    from dvemb.curate.retrain import Variant, fit_variant, write_comparison

    cfg = RunConfig.model_validate(
        {
            "model": {"hidden": [8]},
            "train": {"epochs": 2, "lr": 0.1},
            "data": {"batch_size": 8},
            "capture": {"k_a": 4, "k_s": 4},
        }
    )
    plan = SelectionPlan(
        source_total_steps=12,
        pool_factor=2,
        val_samples=16,
        windows=[Window(start=0, stop=3, mode="online"), Window(start=9, stop=12, mode="online")],
    )
    a = fit_variant(tiny_run, cfg, Variant("sel", tiny_run.data("train"), plan), seed=0, out=tmp_path / "a")
    b = fit_variant(tiny_run, cfg, Variant("sel", tiny_run.data("train"), plan), seed=0, out=tmp_path / "b")
    ra = pl.read_parquet(tmp_path / "a" / "trajectory" / "selection.parquet")
    rb = pl.read_parquet(tmp_path / "b" / "trajectory" / "selection.parquet")
    assert ra.equals(rb) and a["test_acc"] == b["test_acc"]
    assert a["steps"] == 12 and a["selection_steps"] == 6
    online = ra.filter(pl.col("mode") == "online")
    assert sorted(online["step"].unique().to_list()) == [0, 1, 2, 9, 10, 11]
    per = online.group_by("step").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("kept"))
    assert set(per["pool"].to_list()) == {16} and set(per["kept"].to_list()) == {8}
    # kept candidates score at least as high as the rejected ones
    for step in (0, 9):
        g = online.filter(pl.col("step") == step)
        assert g.filter(pl.col("selected"))["score"].min() >= g.filter(~pl.col("selected"))["score"].max()
    # stratified: each kept batch has the pool's label mix (within one place per label)
    strat = plan.model_copy(update={"stratify": True})
    fit_variant(tiny_run, cfg, Variant("strat", tiny_run.data("train"), strat), seed=0, out=tmp_path / "s")
    rs = pl.read_parquet(tmp_path / "s" / "trajectory" / "selection.parquet").filter(pl.col("mode") == "online")
    labels = pl.read_parquet(tiny_run.data("train"), columns=["sample_id", "label"])
    mix = rs.join(labels, on="sample_id").group_by("step", "label").agg(pl.len(), pl.col("selected").sum())
    assert (mix["selected"] - mix["len"] * 8 / 16).abs().max() < 1
    base = fit_variant(tiny_run, cfg, Variant("base", tiny_run.data("train")), seed=0)
    summary = write_comparison([a, base], tmp_path / "cmp")
    assert summary["variant"].to_list() == ["sel", "base"]
    assert (tmp_path / "cmp" / "comparison.json").exists()


def test_phase_detection_divides_out_the_learning_rate_schedule():
    """A U-shaped per-step influence scaled by warmup + cosine LR: the raw curve hides the U, per-LR finds it."""
    import math

    import numpy as np

    from dvemb.score.values import phases_for

    t_total = 200
    lr = np.array([min(1.0, (t + 1) / 20) * 0.5 * (1 + math.cos(math.pi * t / t_total)) for t in range(t_total)])
    u = np.where((np.arange(t_total) < 30) | (np.arange(t_total) >= 150), 1.0, 0.01)  # early + late matter
    occ = pl.DataFrame(
        {
            "sample_id": np.arange(t_total),
            "step": np.arange(t_total),
            "score": lr * u,
            "checkpoint": np.full(t_total, t_total),
        }
    )
    per_lr = phases_for(occ, t_total, smooth=1, lr=lr)
    assert (per_lr.early_end, per_lr.late_start) == (30, 150)
    raw = phases_for(occ, t_total, smooth=1)
    assert (raw.early_end, raw.late_start) != (30, 150)
