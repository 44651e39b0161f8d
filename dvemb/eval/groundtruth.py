"""Ground truth from a run directory: exact TSLOO and all-epoch LOO by replaying the recorded trajectory.

The run records every step's batch (``trajectory/batches.parquet``: sample ids and loss weights), the
optimizer as trained (hyper-parameters, per-group LR and weight decay per step, clipping) and, at every
segment boundary, the parameters and the optimizer state (see :mod:`dvemb.replay.trajectory`). Training
is then a pure function of those, so

* **TSLOO** of occurrence (t, z): start at the nearest boundary b <= t, replay to t, drop z's loss
  weight at step t only, replay to T through the real optimizer (SGD, momentum, AdamW; the clip factor
  recomputed), and report ``l_val(theta'_T) - l_val(theta_T)`` (positive = the occurrence helped);
* **all-epoch LOO** of sample z: replay from step 0 with z's weight zero at every step it appears in
  (the batches are otherwise unchanged, which is exactly the perturbation the summed occurrence
  scores linearise).

Replays of many points run together under ``torch.func.vmap`` (one lane per point plus an untouched
base lane that gives theta_T through the same arithmetic). Before anything else a replay with nothing
removed must reproduce every recorded boundary (model and optimizer state); mixed precision, dropout,
AMSGrad and unknown optimizers are refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import torch
from torch.func import grad, vmap

from dvemb.replay.optim import Params, ReplayError, State, optimizer_step
from dvemb.replay.trajectory import RecordedStep, Trajectory, load_trajectory, replay_range, verify_replay
from dvemb.store.atomic import atomic_path, write_json
from dvemb.store.rundir import RunDir

log = logging.getLogger(__name__)
LaneWeights = Callable[[int, RecordedStep], torch.Tensor]  # (step, recorded step) -> [lanes, B] loss weights

__all__ = ["ReplayError", "all_epoch_loo", "groundtruth", "load_trajectory", "tsloo_points", "verify_replay"]


def _counts(state: State) -> tuple[State, State]:
    """Split the optimizer state into the per-lane tensors and the step counts (equal in every lane)."""
    lanes = {k: v for k, v in state.items() if not k.endswith("::step")}
    return lanes, {k: v for k, v in state.items() if k.endswith("::step")}


def _lanes_replay(traj: Trajectory, start: Params, state: State, first: int, lane_weights: LaneWeights) -> torch.Tensor:
    """Replay steps first..T-1 in parallel lanes; returns each lane's final validation loss [n] (float64).

    start, state: unbatched theta_first and optimizer state; lane_weights(t, step) -> [n, B] loss weights.
    """
    frozen = {k: v for k, v in start.items() if k not in traj.spec.group_of}
    n = lane_weights(first, traj.steps[first]).shape[0]
    lanes, counts = _counts(state)
    params = {k: v.detach().expand(n, *v.shape).clone() for k, v in traj.trained(start).items()}
    lanes = {k: v.detach().expand(n, *v.shape).clone() for k, v in lanes.items()}
    for t in range(first, traj.num_steps):
        rec = traj.steps[t]

        def one(p: Params, s: State, w: torch.Tensor, rec=rec, counts=counts) -> tuple[Params, State]:
            g = grad(lambda q: (w * traj.losses({**frozen, **q}, rec.batch)).sum())(p)
            new_p, new_s = optimizer_step(traj.spec, p, {**s, **counts}, g, rec.hyper)
            return new_p, _counts(new_s)[0]

        w = lane_weights(t, rec)
        params, lanes = vmap(one)(params, lanes, w)
        counts = _next_counts(traj, counts, params)
    with torch.no_grad():
        return vmap(lambda p: traj.val_loss({**frozen, **p}))(params).to(torch.float64)


def _next_counts(traj: Trajectory, counts: State, params: Params) -> State:
    """AdamW's step counts after one more step (absent before the first step)."""
    if traj.spec.kind != "adamw":
        return counts
    if counts:
        return {k: v + 1 for k, v in counts.items()}
    return {f"{k}::step": torch.ones((), dtype=torch.float64) for k in params}


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
            cur_step, cur = b, (traj.checkpoints[b], traj.opt_states[b])
        cur = replay_range(traj, *cur, cur_step, first)
        cur_step = first
        steps = torch.tensor([p[0] for p in pts])
        pos = torch.tensor([p[1] for p in pts])

        def weights(t: int, rec: RecordedStep, steps=steps, pos=pos) -> torch.Tensor:
            w = rec.weights.expand(len(steps) + 1, -1).clone()  # last lane: nothing removed
            hit = (steps == t).nonzero().flatten()
            w[hit, pos[hit]] = 0.0
            return w

        losses = _lanes_replay(traj, *cur, first, weights)
        out[rows] = losses[:-1] - losses[-1]
    return out


def all_epoch_loo(traj: Trajectory, sample_ids: Sequence[int], chunk: int = 64) -> torch.Tensor:
    """Retrain from step 0 without each sample (its weight zero wherever it occurs): l_val' - l_val."""
    out = torch.empty(len(sample_ids), dtype=torch.float64)
    for lo in range(0, len(sample_ids), chunk):
        ids = torch.as_tensor(list(sample_ids[lo : lo + chunk]) + [-1], dtype=torch.int64)  # -1: base lane

        def weights(t: int, rec: RecordedStep, ids=ids) -> torch.Tensor:
            w = rec.weights.expand(len(ids), -1).clone()
            w[ids[:, None] == rec.sample_ids[None, :]] = 0.0
            return w

        losses = _lanes_replay(traj, traj.checkpoints[0], traj.opt_states[0], 0, weights)
        out[lo : lo + len(ids) - 1] = losses[:-1] - losses[-1]
    return out


def choose_points(
    traj: Trajectory, n: int, seed: int = 0, last_epoch: bool = False, first_epoch: bool = False
) -> list[tuple[int, int]]:
    """``n`` distinct (step, position) occurrences drawn uniformly (from the first or last epoch only if asked)."""
    keep = {max(traj.epochs)} if last_epoch else {min(traj.epochs)} if first_epoch else set(traj.epochs)
    pool = [
        (t, p)
        for t, s in enumerate(traj.steps)
        if traj.epochs[t] in keep
        for p in range(len(s.sample_ids))
        if float(s.weights[p]) != 0.0
    ]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[i] for i in pick)


def choose_samples(traj: Trajectory, n: int, seed: int = 0) -> list[int]:
    ids = np.unique(torch.cat([s.sample_ids for s in traj.steps]).numpy())
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
    *,
    first_epoch: bool = False,
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
        "first_epoch": first_epoch,
        "dtype": str(traj.dtype).removeprefix("torch."),
        "optimizer": traj.spec.kind,
        "steps": traj.num_steps,
    }
    ev = run.root / "eval"
    if points > 0:
        occ = choose_points(traj, points, seed, last_epoch, first_epoch)
        vals = tsloo_points(traj, occ, chunk)
        ids = [int(traj.steps[t].sample_ids[p]) for t, p in occ]
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
