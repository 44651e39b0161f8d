"""A recorded run, loaded for exact replay: task, batches, per-step optimizer hyper-parameters, boundary states.

The run directory holds everything a replay needs: the training table and every step's batch
(``trajectory/batches.parquet``: sample ids and loss weights), the optimizer as trained (``run.json``
``optimizer``; per-group LR / weight decay and the clip factor per step in ``steps.parquet``) and, at
every segment boundary, the model parameters and the optimizer state. One step of the replay is
``theta, state <- optimizer_step(theta, state, grad sum_z w_z l_z(theta))`` with the task's per-sample
loss, so a replay with nothing changed reproduces the recorded boundaries (checked by
:func:`verify_replay`), and changing one loss weight is exactly removing one occurrence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from dvemb.replay.optim import OptimizerSpec, Params, ReplayError, State, StepHyper, optimizer_step
from dvemb.task import Batch, Task

if TYPE_CHECKING:  # the run-directory readers (polars, pydantic) load only where a run is read: the sweep
    from pathlib import Path

    import polars as pl  # itself runs where neither is installed (benchmarks/bench_gpu.py)

    from dvemb.store.rundir import RunDir

log = logging.getLogger(__name__)
VAL_BATCH = 512


class LossModel(nn.Module):
    """``task.per_sample_loss(model, batch)`` as a module, so ``functional_call`` can swap the parameters."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.task.per_sample_loss(self.model, batch)


@dataclass(frozen=True)
class RecordedStep:
    """One optimizer step as recorded: the batch, each occurrence's loss weight w, the optimizer's LR/decay."""

    sample_ids: torch.Tensor  # [B] int64
    batch: Batch
    weights: torch.Tensor  # [B], replay dtype
    hyper: StepHyper


@dataclass
class Trajectory:
    """Everything needed to replay a run from any boundary."""

    net: LossModel
    spec: OptimizerSpec
    steps: list[RecordedStep]
    epochs: list[int]
    checkpoints: dict[int, Params]  # boundary step -> theta_b
    opt_states: dict[int, State]  # boundary step -> optimizer state
    val: list[Batch]
    dtype: torch.dtype  # of the replay
    recorded_dtype: torch.dtype  # of the recorded checkpoints (sets the verification tolerance)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def boundaries(self) -> list[int]:
        return sorted(self.checkpoints)

    def nearest_checkpoint(self, step: int) -> int:
        """The latest boundary <= step."""
        return max(b for b in self.checkpoints if b <= step)

    def losses(self, params: Params, batch: Batch) -> torch.Tensor:
        """Per-sample losses [B] of ``batch`` at ``params``."""
        return functional_call(self.net, {f"model.{k}": v for k, v in params.items()}, (batch,))

    def val_loss(self, params: Params) -> torch.Tensor:
        """The validation objective: mean per-sample loss over the validation table (scalar)."""
        n = sum(len(b["sample_id"]) for b in self.val)
        return sum(self.losses(params, b).sum() for b in self.val) / n

    def batch_loss(self, params: Params, t: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """L_t = sum_z w_z l_z(theta) of step ``t`` (``weights`` [B] replaces the recorded w)."""
        s = self.steps[t]
        w = s.weights if weights is None else weights
        return (w * self.losses(params, s.batch)).sum()

    def trained(self, params: Params) -> Params:
        """The parameters the optimizer updates (frozen ones are left out)."""
        return {k: v for k, v in params.items() if k in self.spec.group_of}

    def step(self, params: Params, state: State, t: int, weights: torch.Tensor | None = None) -> tuple[Params, State]:
        """theta_{t+1}, state_{t+1} from theta_t, state_t (detached)."""
        p = {k: v.detach().requires_grad_(k in self.spec.group_of) for k, v in params.items()}
        trained = self.trained(p)
        g = torch.autograd.grad(self.batch_loss(p, t, weights), list(trained.values()))
        with torch.no_grad():
            return optimizer_step(self.spec, params, state, dict(zip(trained, g)), self.steps[t].hyper)


def _check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.AlphaDropout) and m.p > 0:
            raise ReplayError(f"layer {name!r}: dropout p={m.p} draws random masks the run does not record")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise ReplayError(f"layer {name!r}: BatchNorm running statistics are state the replay does not carry")
        p = getattr(m, "dropout", None)
        if isinstance(p, float) and p > 0:
            raise ReplayError(f"layer {name!r}: dropout {p} draws random masks the run does not record")


def check_replayable(run: RunDir) -> None:
    """ReplayError naming the option of the recorded run that the replay cannot reproduce exactly."""
    from dvemb.runtask import run_config

    cfg = run_config(run)
    if cfg.train.precision in ("16-mixed", "bf16-mixed"):
        raise ReplayError(f"train.precision={cfg.train.precision!r}: mixed-precision steps cannot be replayed exactly")
    meta = run.meta()
    if "optimizer" in meta:
        OptimizerSpec.from_json(meta["optimizer"]).check_replayable()
    elif cfg.train.optimizer != "sgd" or cfg.train.momentum:
        raise ReplayError(
            f"{run.run_json}: recorded before optimizer state was kept; only plain SGD runs of that age replay "
            f"(train.optimizer={cfg.train.optimizer!r}, momentum={cfg.train.momentum})"
        )


def _hypers(steps: pl.DataFrame, spec: OptimizerSpec) -> list[StepHyper]:
    if "group_lr" in steps.columns:
        lrs, wds = steps["group_lr"].to_list(), steps["group_weight_decay"].to_list()
        return [StepHyper(tuple(lr), tuple(wd)) for lr, wd in zip(lrs, wds)]
    # a run from before per-group recording: one SGD group, the clip factor already folded into lr
    return [StepHyper((float(lr),), (float(wd),)) for lr, wd in zip(steps["lr"], steps["weight_decay"])]


def load_trajectory(run: RunDir, fp64: bool = False, val: Path | None = None) -> Trajectory:
    """Read the recorded trajectory of ``run`` (ReplayError when it cannot be replayed exactly); the validation
    objective on the table ``val`` (default: the run's own)."""
    import polars as pl

    from dvemb.data import TableDataModule
    from dvemb.runtask import data_info, task_of
    from dvemb.store.rundir import load_tensors
    from dvemb.store.trajectory import read_steps

    check_replayable(run)
    meta = run.meta()
    bounds = list(meta["boundaries"])
    task = task_of(run)
    ckpts = {b: load_tensors(run.checkpoint(b)) for b in bounds}
    recorded = next(iter(ckpts[0].values())).dtype
    dtype = torch.float64 if fp64 else recorded
    model = task.build_model(data_info(run)).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in ckpts[0].items()})
    model.train()
    _check_deterministic(model)
    names = [n for n, _ in model.named_parameters()]
    if "optimizer" in meta:
        spec = OptimizerSpec.from_json(meta["optimizer"])
    else:
        spec = OptimizerSpec("sgd", (tuple(n for n, p in model.named_parameters() if p.requires_grad),))
    opt_states = {}
    for b in bounds:
        path = run.optimizer_state(b)
        opt_states[b] = {k: v.to(dtype) for k, v in load_tensors(path).items()} if path.exists() else {}
        if not path.exists() and b > 0 and spec.state_keys():
            raise ReplayError(f"{path}: missing — the optimizer state at boundary {b} is needed to replay from it")
    df = read_steps(run)
    hypers = _hypers(df, spec)
    data = TableDataModule(run.data("train"), dtype=dtype)
    occ = pl.read_parquet(run.batches).sort("step", "position")
    steps: list[RecordedStep] = []
    for (step,), part in occ.group_by("step", maintain_order=True):
        if step != len(steps):
            raise ReplayError(f"{run.batches}: step {step} follows step {len(steps) - 1}")
        ids = part["sample_id"].to_numpy().copy()
        w = torch.from_numpy(part["weight"].to_numpy().copy()).to(dtype)
        steps.append(RecordedStep(torch.from_numpy(ids), data.get_batch(ids), w, hypers[step]))
    if len(steps) != len(hypers):
        raise ReplayError(f"{run.root}: {len(steps)} recorded batches but {len(hypers)} recorded steps")
    vdm = TableDataModule(val or run.data("val"), batch_size=VAL_BATCH, shuffle=False, dtype=dtype)
    vds = vdm.datasets["train"]
    val = [vds.batch(rows) for rows in vdm.train_sampler.plan(0)]
    return Trajectory(
        net=LossModel(task, model),
        spec=spec,
        steps=steps,
        epochs=df["epoch"].to_list(),
        checkpoints={b: {n: c[n].to(dtype) for n in names} for b, c in ckpts.items()},
        opt_states=opt_states,
        val=val,
        dtype=dtype,
        recorded_dtype=recorded,
    )


def replay_range(traj: Trajectory, params: Params, state: State, first: int, stop: int) -> tuple[Params, State]:
    """(theta, state) at ``stop`` from those at ``first`` (nothing removed)."""
    for t in range(first, stop):
        params, state = traj.step(params, state, t)
    return params, state


def rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max_k max|got_k - want_k| / max|want_k| over the keys of ``want``, and the worst key."""
    worst, key = 0.0, ""
    for k, w in want.items():
        if k not in got:
            return float("inf"), k
        scale = max(float(w.abs().max()), 1e-30)
        e = float((got[k].to(w.dtype) - w).abs().max()) / scale
        if e > worst:
            worst, key = e, k
    return worst, key


SCORING_DRIFT = 1e-2  # float32 runs, exact scoring: largest relative drift accepted (with a warning above 1e-4)


def tolerance(traj: Trajectory, scoring: bool = False) -> float:
    """1e-10 for a float64 run replayed in float64; 1e-4 relative otherwise (float32 reduction order).

    scoring: the exact scorer's limit for a float32 run, ``SCORING_DRIFT``. Its scores are derivatives
    along the replayed trajectory, which restarts from every recorded boundary; a float32 replay can drift
    past 1e-4 inside a segment when a rounding difference flips a ReLU that sits at zero (measured: 4.6e-3 on
    a noisy-MNIST run), which moves the linearisation point, not the meaning of the scores.
    """
    if traj.dtype == traj.recorded_dtype == torch.float64:
        return 1e-10
    return SCORING_DRIFT if scoring else 1e-4


def check_boundary(
    traj: Trajectory, b: int, params: Params, state: State, rtol: float | None = None, scoring: bool = False
) -> float:
    """Compare a replayed state at boundary ``b`` with the recorded one; ReplayError naming the step and deviation
    above the limit (``rtol``, default :func:`tolerance`); a warning above 1e-4 when ``scoring``."""
    limit = tolerance(traj, scoring) if rtol is None else rtol
    err_p, key_p = rel_error(params, traj.checkpoints[b])
    err_s, key_s = rel_error(state, traj.opt_states[b])
    err, key = max((err_p, key_p), (err_s, key_s))
    if err > limit:
        raise ReplayError(
            f"replay misses the recorded state at step {b} by {err:.2e} (relative, {key!r}; limit {limit:.0e}): the "
            "run is not reproducible from its record (optimizer, schedule, nondeterminism?); no scores written"
        )
    if scoring and err > 1e-4:
        log.warning(
            "replay drifts from the recorded state at step %d by %.1e (relative, %r): float32 rounding", b, err, key
        )
    return err


def verify_replay(traj: Trajectory, rtol: float | None = None) -> float:
    """Replay every segment from its start boundary and compare with the next one (model and optimizer state).

    Returns the worst relative max-abs error; raises ReplayError above the tolerance.
    """
    bounds = traj.boundaries
    worst = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        p, s = replay_range(traj, traj.checkpoints[a], traj.opt_states[a], a, b)
        worst = max(worst, check_boundary(traj, b, p, s, rtol))
    return worst
