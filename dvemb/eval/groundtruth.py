"""Ground truth from a run directory: exact TSLOO and all-epoch LOO by replaying the recorded trajectory.

The run records every step's batch (``trajectory/batches.parquet``: sample ids and loss weights),
the learning rate and weight decay actually applied (``trajectory/steps.parquet``), the training
table (``data/train.parquet``) and the parameters at every segment boundary. Plain SGD is then a
pure function of those, so

* **TSLOO** of occurrence (t, z): start at the nearest boundary checkpoint b <= t, replay to t,
  drop z's loss weight at step t only, replay to T, and report ``l_val(theta'_T) - l_val(theta_T)``
  (positive = the occurrence helped);
* **all-epoch LOO** of sample z: replay from step 0 with z's weight zero at every step it appears in
  (the batches are otherwise unchanged, which is exactly the perturbation DVEmb's summed occurrence
  scores linearise).

Replays of many points run together under ``torch.func.vmap`` (one lane per point plus an untouched
base lane that gives theta_T through the same arithmetic). Before anything else a replay with nothing
removed must reproduce every recorded boundary checkpoint; runs with AdamW, momentum or mixed
precision are refused (they are not replayable as plain SGD).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.func import functional_call, vmap

from dvemb.config import RunConfig, load_config
from dvemb.data import TableDataModule
from dvemb.embed.segments import Schedule
from dvemb.errors import DvembError
from dvemb.eval.replay import Batch, Params, functional_sgd_step, sgd_step
from dvemb.models.loss import per_sample_cross_entropy
from dvemb.models.registry import build_model
from dvemb.store.atomic import atomic_path, write_json
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.store.trajectory import read_schedule, read_steps

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ReplayError(DvembError):
    """The run cannot be replayed exactly as plain SGD, or a replay does not reproduce it."""


@dataclass
class Trajectory:
    """Everything needed to replay a run: model, per-step batches, schedule, boundary checkpoints, val data."""

    model: nn.Module
    batches: list[Batch]
    schedule: Schedule
    epochs: list[int]
    checkpoints: dict[int, Params]  # boundary step -> theta_b
    val: tuple[torch.Tensor, torch.Tensor]
    dtype: torch.dtype  # of the replay
    recorded_dtype: torch.dtype  # of the recorded checkpoints (sets the verification tolerance)
    loss_fn: LossFn = per_sample_cross_entropy

    @property
    def steps(self) -> int:
        return len(self.batches)

    def nearest_checkpoint(self, step: int) -> int:
        """The latest boundary <= step."""
        return max(b for b in self.checkpoints if b <= step)


def check_replayable(cfg: RunConfig) -> None:
    t = cfg.train
    if t.optimizer != "sgd":
        raise ReplayError(
            f"train.optimizer={t.optimizer!r}: only plain SGD runs can be replayed exactly (AdamW keeps moment "
            "state that the run directory does not record)"
        )
    if t.momentum:
        raise ReplayError(f"train.momentum={t.momentum}: SGD with momentum is not replayable as plain SGD")
    if t.precision in ("16-mixed", "bf16-mixed"):
        raise ReplayError(f"train.precision={t.precision!r}: mixed-precision steps cannot be replayed exactly")
    if t.grad_clip is not None:
        raise ReplayError(
            f"train.grad_clip={t.grad_clip}: removing a sample changes the clip factor, which the replay (recorded "
            "LRs) does not recompute"
        )


def load_trajectory(run: RunDir, fp64: bool = False) -> Trajectory:
    """Read the recorded trajectory of ``run`` (raises ReplayError for a non-SGD run)."""
    run.require("train")
    cfg = load_config(None, [], base=run.meta()["config"])
    check_replayable(cfg)
    shape = run.meta()["model_shape"]
    model = build_model(cfg.model, shape["d_in"], shape["n_out"], shape["block_size"])
    ckpts = {b: load_tensors(run.checkpoint(b)) for b in run.boundaries}
    recorded = next(iter(ckpts[0].values())).dtype
    dtype = torch.float64 if fp64 else recorded
    model = model.to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in ckpts[0].items()})
    names = [n for n, _ in model.named_parameters()]
    checkpoints = {b: {n: c[n].to(dtype) for n in names} for b, c in ckpts.items()}
    schedule = read_schedule(run)
    epochs = read_steps(run)["epoch"].to_list()
    data = TableDataModule(run.data("train"), dtype=dtype)
    occ = pl.read_parquet(run.batches).sort("step", "position")
    batches = []
    for (step,), df in occ.group_by("step", maintain_order=True):
        if step != len(batches):
            raise ReplayError(f"{run.batches}: step {step} follows step {len(batches) - 1}")
        ids = df["sample_id"].to_numpy().copy()
        b = data.get_batch(ids)
        w = torch.from_numpy(df["weight"].to_numpy().copy()).to(dtype)
        batches.append(Batch(torch.from_numpy(ids), b["x"], b["y"], w))
    if len(batches) != len(schedule.lr):
        raise ReplayError(f"{run.root}: {len(batches)} recorded batches but {len(schedule.lr)} recorded steps")
    vds = TableDataModule(run.data("val"), dtype=dtype).datasets["train"]
    vb = vds.batch(np.arange(len(vds)))
    return Trajectory(model, batches, schedule, epochs, checkpoints, (vb["x"], vb["y"]), dtype, recorded)


def replay_range(traj: Trajectory, start: Params, first: int, stop: int) -> Params:
    """theta_stop from theta_first = ``start`` (nothing removed)."""
    p = start
    for t in range(first, stop):
        lr, wd = traj.schedule.at(t)
        p = sgd_step(traj.model, p, traj.batches[t], lr, wd, traj.loss_fn)
    return p


def verify_replay(traj: Trajectory, rtol: float | None = None) -> float:
    """Replay every segment from its start checkpoint and compare with the next one.

    Returns the worst relative max-abs error; raises ReplayError above ``rtol`` (default by dtype
    of the recorded checkpoints: 1e-9 for float64, 1e-4 for float32 or a float32 run replayed in float64).
    """
    bounds = sorted(traj.checkpoints)
    worst = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        got = replay_range(traj, traj.checkpoints[a], a, b)
        want = traj.checkpoints[b]
        scale = max(float(v.abs().max()) for v in want.values())
        err = max(float((got[k] - want[k]).abs().max()) for k in want) / scale
        worst = max(worst, err)
        exact = traj.dtype == traj.recorded_dtype == torch.float64
        limit = rtol if rtol is not None else (1e-9 if exact else 1e-4)
        if err > limit:
            raise ReplayError(
                f"replaying steps {a}..{b - 1} from checkpoint {a} misses checkpoint {b} by {err:.2e} (relative, "
                f"limit {limit:.0e}): the run is not plain SGD over the recorded batches (optimizer, "
                "schedule, nondeterminism?)"
            )
    return worst


def _lanes_replay(
    traj: Trajectory, start: Params, first: int, lane_weights: Callable[[int, Batch], torch.Tensor]
) -> torch.Tensor:
    """Replay steps first..T-1 in parallel lanes; returns each lane's final validation loss [n].

    start: unbatched theta_first; lane_weights(t, batch) -> [n, B] loss weights of step t per lane.
    """
    model, loss_fn = traj.model, traj.loss_fn

    step_fn = functional_sgd_step(model, loss_fn)

    def val_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (traj.val[0],)), traj.val[1]).mean()

    n = lane_weights(first, traj.batches[first]).shape[0]
    params = {k: v.detach().expand(n, *v.shape).clone() for k, v in start.items()}
    for t in range(first, traj.steps):
        lr, wd = traj.schedule.at(t)
        b = traj.batches[t]
        params = vmap(step_fn, in_dims=(0, None, 0, None, None))(params, b, lane_weights(t, b), lr, 1.0 - lr * wd)
    with torch.no_grad():
        return vmap(val_loss)(params).to(torch.float64)


def tsloo_points(traj: Trajectory, occurrences: Sequence[tuple[int, int]], chunk: int = 64) -> torch.Tensor:
    """Exact TSLOO for (step, position) occurrences: l_val(theta'_T) - l_val(theta_T), positive = helped."""
    order = sorted(range(len(occurrences)), key=lambda i: occurrences[i])
    out = torch.empty(len(occurrences), dtype=torch.float64)
    cur_step, cur = None, None  # an unbatched replay, advanced as the chunks move forward in time
    for lo in range(0, len(order), chunk):
        rows = order[lo : lo + chunk]
        pts = [occurrences[i] for i in rows]
        first = pts[0][0]
        b = traj.nearest_checkpoint(first)
        if cur_step is None or cur_step > first or cur_step < b:
            cur_step, cur = b, traj.checkpoints[b]
        cur = replay_range(traj, cur, cur_step, first)
        cur_step = first
        steps = torch.tensor([p[0] for p in pts])
        pos = torch.tensor([p[1] for p in pts])

        def weights(t: int, batch: Batch, steps=steps, pos=pos) -> torch.Tensor:
            w = batch.weights.expand(len(steps) + 1, -1).clone()  # last lane: nothing removed
            hit = (steps == t).nonzero().flatten()
            w[hit, pos[hit]] = 0.0
            return w

        losses = _lanes_replay(traj, cur, first, weights)
        out[rows] = losses[:-1] - losses[-1]
    return out


def all_epoch_loo(traj: Trajectory, sample_ids: Sequence[int], chunk: int = 64) -> torch.Tensor:
    """Retrain from step 0 without each sample (its weight zero wherever it occurs): l_val' - l_val."""
    out = torch.empty(len(sample_ids), dtype=torch.float64)
    start = traj.checkpoints[0]
    for lo in range(0, len(sample_ids), chunk):
        ids = torch.as_tensor(list(sample_ids[lo : lo + chunk]) + [-1], dtype=torch.int64)  # -1: base lane

        def weights(t: int, batch: Batch, ids=ids) -> torch.Tensor:
            w = batch.weights.expand(len(ids), -1).clone()
            w[ids[:, None] == batch.sample_ids[None, :]] = 0.0
            return w

        losses = _lanes_replay(traj, start, 0, weights)
        out[lo : lo + len(ids) - 1] = losses[:-1] - losses[-1]
    return out


def choose_points(traj: Trajectory, n: int, seed: int = 0, last_epoch: bool = False) -> list[tuple[int, int]]:
    """``n`` distinct (step, position) occurrences drawn uniformly (from the last epoch only if asked)."""
    last = max(traj.epochs)
    pool = [
        (t, p)
        for t, b in enumerate(traj.batches)
        if not last_epoch or traj.epochs[t] == last
        for p in range(len(b.sample_ids))
        if float(b.weights[p]) != 0.0
    ]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[i] for i in pick)


def choose_samples(traj: Trajectory, n: int, seed: int = 0) -> list[int]:
    ids = np.unique(torch.cat([b.sample_ids for b in traj.batches]).numpy())
    rng = np.random.default_rng([seed, 1])
    return sorted(int(i) for i in rng.choice(ids, size=min(n, len(ids)), replace=False))


def groundtruth(
    run: RunDir,
    points: int = 200,
    seed: int = 0,
    last_epoch: bool = False,
    all_epoch: int = 0,
    fp64: bool = False,
    chunk: int = 64,
) -> dict:
    """Write ``eval/groundtruth.parquet`` (step, sample_id, tsloo) [and ``eval/groundtruth_all.parquet``
    (sample_id, loo) when ``all_epoch`` > 0] plus ``eval/groundtruth.json``; returns the summary."""
    traj = load_trajectory(run, fp64=fp64)
    err = verify_replay(traj)
    log.info("replay reproduces the boundary checkpoints to %.2e (relative)", err)
    summary = {
        "replay_rel_error": err,
        "seed": seed,
        "last_epoch": last_epoch,
        "fp64": traj.dtype == torch.float64,
        "steps": traj.steps,
    }
    ev = run.root / "eval"
    if points > 0:
        occ = choose_points(traj, points, seed, last_epoch)
        vals = tsloo_points(traj, occ, chunk)
        ids = [int(traj.batches[t].sample_ids[p]) for t, p in occ]
        df = pl.DataFrame(
            {"step": [t for t, _ in occ], "sample_id": ids, "tsloo": vals.numpy()},
            schema={"step": pl.Int64, "sample_id": pl.Int64, "tsloo": pl.Float64},
        )
        with atomic_path(ev / "groundtruth.parquet") as tmp:
            df.write_parquet(tmp)
        summary["points"] = len(occ)
    if all_epoch > 0:
        ids = choose_samples(traj, all_epoch, seed)
        loo = all_epoch_loo(traj, ids, chunk)
        df = pl.DataFrame({"sample_id": ids, "loo": loo.numpy()}, schema={"sample_id": pl.Int64, "loo": pl.Float64})
        with atomic_path(ev / "groundtruth_all.parquet") as tmp:
            df.write_parquet(tmp)
        summary["all_epoch_samples"] = len(ids)
    write_json(ev / "groundtruth.json", summary)
    return summary
