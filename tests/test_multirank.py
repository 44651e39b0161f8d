"""Multi-rank capture: a 2-rank CPU DDP run (Lightning, gloo, fork-server launched) on digits in fp64
equals a one-process run fed the same global batches.

Independent reference: the one-process run with ``data.batch_size`` = 2 x the per-rank batch size plans
exactly the same global batches (the order of epoch e is a pure function of (seed, e)), so everything
recorded must agree: the trajectory (sample order, weights 1/(B_local * W) = 1/B_global, losses), the
checkpoints, and the scores of every mode (direct, embedding, exact replay) to rtol 1e-8 — DDP only
changes the summation order of the gradient (fp64 rounding, ~1e-16 per step). An uneven last batch is
recorded as DDP weighted it (the exact replay reproduces the checkpoints). Bad input: a missing shard,
shards covering other steps or claiming the same sample, and a rank killed mid-run (SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist

from dvemb.config import ConfigError, load_config
from dvemb.data import TableDataModule
from dvemb.embed.run import embed_segment
from dvemb.errors import StoreError
from dvemb.score.run import score
from dvemb.store.gradstore import SegmentWriter, read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.tasks import MLPTask
from dvemb.train.run import RankFailedError, train

B_LOCAL, WORLD = 16, 2
SETS = [
    "data.subset=256",  # 8 global batches of 32 per epoch, none short
    "train.epochs=2",
    "train.precision=64-true",
    "capture.dtype=float64",
    "capture.k_a=null",
    "capture.k_s=null",
    "embed.dtype=float64",
    "embed.segments=2",
]
DDP = [f"data.batch_size={B_LOCAL}", f"train.devices={WORLD}", "train.strategy=ddp", "train.accelerator=cpu"]
ONE = [f"data.batch_size={B_LOCAL * WORLD}"]
KILL_AT = 11  # rank 1 dies in its 11th training forward pass: step 10, segment 1


class DyingTask(MLPTask):
    """The built-in MLP task, except that rank 1 of a DDP run is killed (SIGKILL) at step ``KILL_AT - 1``."""

    calls = 0

    def per_sample_loss(self, model, batch):
        if model.training and dist.is_initialized() and dist.get_rank() == 1:
            DyingTask.calls += 1
            if DyingTask.calls == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().per_sample_loss(model, batch)


def config(*sets: str):
    return load_config("configs/digits_mlp.yaml", [*SETS, *sets])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[RunDir, RunDir]:
    root = tmp_path_factory.mktemp("multirank")
    one = train(config(*ONE), RunDir(root / "one"), progress=False)
    two = train(config(*DDP), RunDir(root / "two"), progress=False)
    return one, two


def with_mode(cfg, mode: str):
    return cfg.model_copy(update={"score": cfg.score.model_copy(update={"mode": mode})})


def test_each_rank_writes_its_shard_and_rank_0_the_global_trajectory(runs):
    one, two = runs
    meta = two.meta()
    assert meta["status"] == "trained" and meta["world_size"] == WORLD and two.world_size == WORLD
    two.require("train")
    b = two.boundaries
    assert b == one.boundaries == [0, 8, 16]
    assert sorted(p.name for p in (two.root / "grads").glob("seg-*")) == [
        f"seg-{j:04d}-rank-{r}.arrow" for j in range(2) for r in range(WORLD)
    ]
    got, want = pl.read_parquet(two.batches), pl.read_parquet(one.batches)
    assert got.columns == ["step", "position", "rank", "sample_id", "weight"]
    assert got["sample_id"].to_list() == want["sample_id"].to_list()  # the same global batches, same order
    assert got["position"].to_list() == want["position"].to_list()
    assert got["rank"].to_list() == [r for _ in range(16) for r in range(WORLD) for _ in range(B_LOCAL)]
    np.testing.assert_array_equal(got["weight"].to_numpy(), 1.0 / (B_LOCAL * WORLD))
    # rank r trained on the r-th slice of each planned global batch
    dm = TableDataModule(two.data("train"), batch_size=B_LOCAL, seed=0, world_size=WORLD)
    planned = np.concatenate(dm.planned_order(2))
    np.testing.assert_array_equal(got["sample_id"].to_numpy(), planned)
    for r in range(WORLD):  # each shard holds its rank's rows, recorded as such
        with pa.memory_map(str(two.grads(1, r))) as f:
            shard = pa.ipc.open_file(f).read_all()
        assert shard.schema.metadata[b"rank"] == str(r).encode() and shard.schema.metadata[b"world_size"] == b"2"
        mine = got.filter((pl.col("rank") == r) & (pl.col("step") >= 8))
        assert shard["sample_id"].to_pylist() == mine["sample_id"].to_list()
    # the merged segment: global per-step records in batches.parquet order, equal to the one-process store
    merged, single = read_segment(two.grads(0), range(0, 8), "grads"), read_segment(one.grads(0), range(0, 8), "grads")
    for m, s in zip(merged, single, strict=True):
        assert torch.equal(m.sample_ids, s.sample_ids) and torch.equal(m.weights, s.weights)
        for name in s.grads:
            torch.testing.assert_close(m.grads[name], s.grads[name], rtol=1e-10, atol=1e-15)
    s1, s2 = pl.read_parquet(one.steps), pl.read_parquet(two.steps)
    assert s2["batch_size"].to_list() == [B_LOCAL * WORLD] * 16
    np.testing.assert_allclose(s2["loss"].to_numpy(), s1["loss"].to_numpy(), rtol=1e-12)
    for step in b:
        c1, c2 = load_tensors(one.checkpoint(step)), load_tensors(two.checkpoint(step))
        for k in c1:
            torch.testing.assert_close(c2[k], c1[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["direct", "embedding", "exact"])
def test_scores_equal_a_one_process_run(runs, mode):
    """The same occurrence scores, whatever the mode: embedding / direct read the merged shards; the exact
    replay needs only the global batches and weights of batches.parquet."""
    one, two = runs
    cfg = with_mode(config(*ONE), mode)
    out = []
    for run in runs:
        if mode == "embedding":
            for j in range(len(run.boundaries) - 1):
                embed_segment(run, j, cfg.embed, score_mode=mode)
        score(run, cfg)
        out.append(pl.read_parquet(run.occurrences).sort("checkpoint", "step", "sample_id"))
    want, got = out
    assert got.height == want.height == 2 * 16 * 32 - 8 * 32  # checkpoint 8 scores steps 0..7, 16 all
    assert got.select("checkpoint", "step", "sample_id").equals(want.select("checkpoint", "step", "sample_id"))
    s = want["score"].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), s, rtol=1e-8, atol=1e-8 * np.abs(s).max())


@pytest.mark.parametrize(
    "sets",
    [
        ["embed.curvature=fisher"],  # curvature shards, merged like the gradients
        ["train.optimizer=adamw", "train.lr=0.01", "capture.kind=rowwise", "capture.k_a=8", "capture.k_s=8"],
        # the exact Hessian replays the DDP run's global batches; clipping's derivative reads the merged shards
        ["train.accumulate=2", "train.grad_clip=0.5", "train.momentum=0.9", "embed.curvature=hessian"],
    ],
    ids=["fisher", "adamw-rowwise", "accumulate-clip-momentum-hessian"],
)
def test_variants_score_as_a_one_process_run(tmp_path, sets):
    one = train(config(*ONE, *sets), RunDir(tmp_path / "one"), progress=False)
    two = train(config(*DDP, *sets), RunDir(tmp_path / "two"), progress=False)
    for mode in ("direct", "exact"):
        out = []
        for run in (one, two):
            score(run, with_mode(config(*ONE, *sets), mode))
            out.append(pl.read_parquet(run.occurrences).sort("checkpoint", "step", "sample_id")["score"].to_numpy())
        np.testing.assert_allclose(out[1], out[0], rtol=1e-8, atol=1e-8 * np.abs(out[0]).max(), err_msg=mode)


def test_planned_sampler_slices_each_global_batch():
    """Rank r iterates the r-th slice of each batch of the one-process plan of batch size B x W; a short
    last batch is split as evenly as possible, one with fewer rows than ranks is dropped."""
    n, b, w = 75, 8, 3  # global batches of 24: 3 full, then 3 rows (one per rank)
    one = TableDataModule(feature_table(n), batch_size=b * w, seed=5).train_sampler
    ranks = [TableDataModule(feature_table(n), batch_size=b, seed=5, world_size=w).train_sampler for _ in range(w)]
    for r, sampler in enumerate(ranks):
        sampler.rank = r
        sampler.set_epoch(2)
    assert all(len(s) == 4 for s in ranks) and [len(x) for x in ranks[0].plan(2)] == [24, 24, 24, 3]
    got = [list(s) for s in ranks]
    for i, batch in enumerate(one.plan(2)):
        assert sum((got[r][i] for r in range(w)), []) == batch.tolist()
    short = [TableDataModule(feature_table(74), batch_size=b, seed=5, world_size=w).train_sampler for _ in range(w)]
    assert len(short[0]) == 3  # 2 rows left for 3 ranks: dropped


def feature_table(n: int) -> pa.Table:
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n, dtype=np.float32)), 2)
    return pa.table({"sample_id": np.arange(n), "x": x, "label": np.zeros(n, dtype=np.int64)})


def test_an_uneven_last_batch_is_recorded_as_ddp_weighted_it(tmp_path):
    """The last global batch of 27 is split 14 / 13: DDP weights the ranks' samples 1/(14 x 2) and
    1/(13 x 2); the exact replay of the recorded batches and weights reproduces the checkpoints to 1e-10."""
    from dvemb.replay.trajectory import load_trajectory, verify_replay

    sets = ["data.subset=251", "train.epochs=1"]
    run = train(config(*DDP, *sets), RunDir(tmp_path / "run"), progress=False)
    last = pl.read_parquet(run.batches).filter(pl.col("step") == 7)
    assert last.group_by("rank").agg(pl.len(), pl.col("weight").unique()).sort("rank").rows() == [
        (0, 14, [1 / 28]),
        (1, 13, [1 / 26]),
    ]
    assert verify_replay(load_trajectory(run)) < 1e-10


def test_bad_rank_configs_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"train.devices=2 needs train.strategy=ddp"):
        config("train.devices=2")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ConfigError, match=r"train.devices=2 \(accelerator gpu\): this machine has \d CUDA"):
            train(config(*DDP, "train.accelerator=gpu"), RunDir(tmp_path / "run"), progress=False)
        assert not (tmp_path / "run").exists()


def copy_run(run: RunDir, dst) -> RunDir:
    shutil.copytree(run.root, dst)
    return RunDir(dst)


def test_missing_shard_is_named(runs, tmp_path):
    run = copy_run(runs[1], tmp_path / "run")
    run.grads(1, 1).unlink()
    with pytest.raises(StoreError, match=r"seg-0001-rank-1\.arrow: missing — the shard of rank 1"):
        read_segment(run.grads(1), range(8, 16), "grads")
    with pytest.raises(StoreError, match=r"stage 'train' is incomplete; missing grads/seg-0001-rank-1\.arrow"):
        score(run, with_mode(config(*ONE), "direct"))


def test_overlapping_shards_are_named(runs, tmp_path):
    run = copy_run(runs[1], tmp_path / "run")
    shutil.copyfile(run.grads(1, 1), run.grads(0, 1))  # rank 1's shard of segment 0 now holds steps 8..15
    with pytest.raises(StoreError, match=r"seg-0000-rank-1\.arrow: segment should cover steps 0\.\.7.*unexpected"):
        read_segment(run.grads(0), range(0, 8), "grads")
    with pytest.raises(StoreError, match=r"seg-0000-rank-1\.arrow: covers steps 8\.\.15 .* seg-0000-rank-0\.arrow"):
        read_segment(run.grads(0, 1))
    # two ranks claiming one sample in the same step
    dims = {"w": 2}
    for r, ids in enumerate([[1, 2], [3, 2]]):
        with SegmentWriter(tmp_path / f"seg-0000-rank-{r}.arrow", dims, rank=r, world_size=2) as w:
            w.write(0, torch.tensor(ids), torch.full((2,), 0.25, dtype=torch.float64), {"w": torch.zeros(2, 2)})
    with pytest.raises(StoreError, match=r"seg-0000-rank-1\.arrow: step 0: sample_id 2 is also in seg-0000-rank-0"):
        read_segment(tmp_path / "seg-0000-rank-0.arrow")
    # a one-process file under a rank name, or a shard renamed to another rank
    shutil.copyfile(tmp_path / "seg-0000-rank-0.arrow", tmp_path / "seg-0001-rank-1.arrow")
    with pytest.raises(StoreError, match=r"seg-0001-rank-1\.arrow: holds the shard of rank 0 .* says otherwise"):
        read_segment(tmp_path / "seg-0001-rank-1.arrow")


def test_a_rank_that_dies_mid_run_is_named_and_the_run_is_not_complete(tmp_path):
    cfg = config(*DDP).model_copy(update={"task": "test_multirank:DyingTask"})
    run = RunDir(tmp_path / "run")
    with pytest.raises(RankFailedError, match=r"rank 1 of 2 died \(killed by SIGKILL\); training stopped"):
        train(cfg, run, progress=False)
    meta = run.meta()
    assert meta["status"] == "failed" and "rank 1 of 2 died" in meta["error"]
    assert run.grads(0, 1).exists() and not run.grads(1, 1).exists()  # segment 0 done, segment 1 not
    with pytest.raises(StoreError, match="stage 'train' is incomplete"):
        run.require("train")
