"""Lightning callback: per-sample projected gradients, the exact trajectory and boundary checkpoints.

Writes into a :class:`~dvemb.store.rundir.RunDir`: ``grads/seg-XXXX-rank-0.arrow`` (one file per
segment, each written atomically when the segment ends), ``grads/projection.json``,
``checkpoints/step-XXXXXX.safetensors`` at every segment boundary and at the end, and
``trajectory/steps.parquet`` / ``batches.parquet`` (each finished segment's rows are written when it
ends, ``trajectory/segments/{steps,batches}-XXXX.parquet``, and merged at the end of training, so an
interrupted run keeps them; dvemb.train.resume). Each batch must carry ``batch["sample_id"]``.
The optimizer as trained is recorded too, so the run can be replayed exactly (dvemb.replay): its
hyper-parameters and param groups in run.json (``optimizer``), every group's LR and weight decay and
the clip factor per step in steps.parquet, and its state beside every boundary checkpoint
(``checkpoints/optimizer-XXXXXX.safetensors``, keys ``"{parameter}::{state key}"``).
With ``curvature`` fisher / fisher_mc it also writes the curvature vectors of every step, formed at
the pre-update parameters, to ``grads/curv-seg-XXXX-rank-0.arrow`` (see :mod:`dvemb.embed.curvature`).
The learning rate recorded is the one in the optimizer when it steps (schedules included).

Several ranks (Lightning DDP, ``train.devices`` > 1): every rank writes its own shard of each segment,
``grads/seg-XXXX-rank-R.arrow`` (and ``curv-seg-XXXX-rank-R.arrow``), with the rows of its local batches;
DDP averages the ranks' gradients, so each occurrence's weight is relative to the global batch
(``1/(B_local * W)`` under mean reduction) and the stored contribution is the rank's divided by W. At the
end of every segment the ranks' per-step rows (sample ids, weights, loss) are gathered to rank 0
(``all_gather_object``, in memory), which alone writes run.json, the checkpoints and the trajectory:
``batches.parquet`` holds the global batch of every step (the ranks' local batches concatenated in rank
order, column ``rank``) and ``steps.parquet`` the mean of the ranks' losses and the global batch size.
"""

from __future__ import annotations

import logging
import signal
from contextlib import suppress

import lightning as L
import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException

from dvemb.capture.fisher import captures_curvature, concat_records, curvature_path, fisher_vectors
from dvemb.capture.hooks import GradientCapture, ProjectionConfig, loss_weight
from dvemb.checks import record_segments_used
from dvemb.errors import CaptureError
from dvemb.store import integrity
from dvemb.store.atomic import atomic_path
from dvemb.store.gradstore import SegmentWriter, write_projection
from dvemb.store.rundir import RunDir, save_tensors
from dvemb.types import OptimizerSpec, torch_state

log = logging.getLogger(__name__)

_CANCEL_TYPES = {"KeyboardInterrupt", "SIGTERMException", "TerminationSignal", "Abort", "CancelledError"}


def cancelled(exc: BaseException) -> bool:
    """A user's or an orchestrator's stop (Ctrl-C, SIGTERM, a cancelled flow run), not a failure."""
    return any(t.__name__ in _CANCEL_TYPES for t in type(exc).__mro__)


def segment_boundaries(total_steps: int, segments: int) -> list[int]:
    """0 = b_0 < … < b_K = T, as even as possible (K <= T)."""
    k = max(1, min(segments, total_steps))
    return sorted({round(i * total_steps / k) for i in range(k + 1)})


def rank_failure(exception: BaseException, procs: list, world: int) -> str | None:
    """What a failed multi-rank training says about its ranks (None: not a rank's failure).

    exception: what the launcher raised in the main process; procs: its rank processes (rank order).
    The rank named first is one killed by a signal other than the SIGTERM the launcher stops the others
    with, else the one whose failure the launcher saw first."""
    if not isinstance(exception, ProcessException):
        return None

    def how(code: int | None) -> str:
        if code is None or code >= 0:
            return f"exit code {code}"
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"

    codes = [getattr(p, "exitcode", None) for p in procs]
    killed = [r for r, c in enumerate(codes) if c is not None and c < 0 and c != -signal.SIGTERM]
    first = killed[0] if killed else exception.error_index
    what = how(codes[first]) if first < len(codes) else ""
    raised = [ln.strip() for ln in str(exception).splitlines() if ln.strip()]
    if not killed and raised and not raised[-1].startswith("process "):
        what = raised[-1]  # the last line of the rank's traceback: its error
    others = ", ".join(f"rank {r} {how(c)}" for r, c in enumerate(codes) if r != first and c not in (None, 0))
    return f"rank {first} of {world} died ({what}); training stopped" + (f" ({others})" if others else "")


def write_parquet(df: pl.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def merge_trajectory(run: RunDir) -> int:
    """``trajectory/steps.parquet`` and ``batches.parquet`` from the segments' parts (in segment order),
    then the parts are deleted; returns the number of steps. The same code for a run trained in one go
    and a resumed one, so both files are byte-identical."""
    k = len(run.boundaries) - 1
    parts = {kind: [run.trajectory_part(kind, j) for j in range(k)] for kind in ("steps", "batches")}
    parts = {kind: [p for p in paths if p.exists()] for kind, paths in parts.items()}
    steps = pl.concat([pl.read_parquet(p) for p in parts["steps"]], rechunk=True)
    write_parquet(steps, run.steps)
    write_parquet(pl.concat([pl.read_parquet(p) for p in parts["batches"]], rechunk=True), run.batches)
    done = [p for paths in parts.values() for p in paths]
    for p in done:
        p.unlink()
    integrity.forget(done)
    with suppress(OSError):
        run.trajectory_part("steps", 0).parent.rmdir()
    return int(steps["step"].max()) + 1 if steps.height else 0


class GradientLogger(L.Callback):
    """Records what DVEmb needs while a LightningModule with a ``.model`` attribute trains."""

    def __init__(
        self,
        run: RunDir,
        projection: ProjectionConfig,
        segments: int = 1,
        layers: str | list[str] | None = None,
        reduction: str = "mean",
        curvature: str | None = None,
        fisher_samples: int | None = None,
        resume_step: int | None = None,
    ):
        """curvature / fisher_samples: None = as in the run's recorded config (embed.curvature), else empirical.
        resume_step: the inner boundary a resumed run starts at (its files are there; dvemb.train.resume)."""
        self.run, self.projection, self.segments = run, projection, segments
        self.curvature, self.fisher_samples = curvature, fisher_samples
        self._curv_writer: SegmentWriter | None = None
        self._curv_inputs: list[tuple[torch.Tensor, dict, float]] = []  # (ids, micro-batch, w) of the step
        self._curv_rec = None
        self.layers, self.reduction = layers, reduction
        self.capture: GradientCapture | None = None
        self.boundaries: list[int] = []
        self._writer: SegmentWriter | None = None
        self._ctx = None
        self._step_rows: list[dict] = []
        self._batch_rows: list[pl.DataFrame] = []
        self._lr_wd = (0.0, 0.0)
        self._groups: tuple[list[float], list[float]] = ([], [])  # per-group LR, weight decay of the step
        self._names: dict[int, str] = {}  # id(parameter) -> name in the model's state_dict
        self._scale = 1.0
        self._saved_at = resume_step  # boundary whose checkpoint is written (once: end of a step or start)
        self.rank, self.world = 0, 1  # this process's DDP rank, of world ranks (set when fitting starts)

    # --- set-up ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rank, self.world = int(trainer.global_rank), int(trainer.world_size)
        total = int(trainer.estimated_stepping_batches)
        self.boundaries = segment_boundaries(total, self.segments)
        self.capture = GradientCapture(pl_module.model, self.projection, self.layers)
        if self.rank == 0:
            write_projection(self.run.projection, self.capture.specs, self.projection, self.capture.skipped)
        embed_cfg = (self.run.meta().get("config") or {}).get("embed", {}) if self.run.run_json.exists() else {}
        if self.curvature is None:
            self.curvature = embed_cfg.get("curvature", "empirical")
        if self.fisher_samples is None:
            self.fisher_samples = int(embed_cfg.get("fisher_samples", 1))
        self._captures = captures_curvature(self.curvature)
        self._names = {id(p): n for n, p in pl_module.model.named_parameters()}
        clip = getattr(getattr(pl_module, "cfg", None), "grad_clip", None)
        spec = OptimizerSpec.from_torch(trainer.optimizers[0], self._names, grad_clip=clip)
        if self.rank == 0:
            self.run.update_meta(
                boundaries=self.boundaries,
                total_steps=total,
                status="training",
                optimizer=spec.to_json(),
                world_size=self.world,
            )
            record_segments_used(self.run, self.segments)

    def _save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Model state_dict and optimizer state at boundary ``step`` (both safetensors, atomic; rank 0 only:
        DDP keeps the ranks' parameters equal)."""
        if self.rank != 0:
            return
        save_tensors(self.run.checkpoint(step), pl_module.model.state_dict())
        state = torch_state(trainer.optimizers[0], self._names)
        save_tensors(self.run.optimizer_state(step), {k: v.to(torch.float64) for k, v in state.items()})

    def _scaler(self, trainer: L.Trainer):
        return getattr(trainer.precision_plugin, "scaler", None)

    def _segment_of(self, step: int) -> int:
        return int(np.searchsorted(self.boundaries, step, side="right")) - 1

    # --- per micro-batch ------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._writer is None:  # first micro-batch of a segment
            if step in self.boundaries and step != self._saved_at:
                self._save_checkpoint(trainer, pl_module, step)
                self._saved_at = step
            j = self._segment_of(step)
            dims = {n: s.dim for n, s in self.capture.specs.items()}
            shard = {"dtype": self.projection.dtype, "rank": self.rank, "world_size": self.world}
            self._writer = SegmentWriter(self.run.grads(j, self.rank), dims, **shard)
            if self._captures:
                path = curvature_path(self.run, j, self.rank)
                self._curv_writer = SegmentWriter(path, dims, kind="curvature", **shard)
        scaler = self._scaler(trainer)
        self._scale = float(scaler.get_scale()) if scaler is not None else 1.0
        task = getattr(pl_module, "task", None)
        ids = task.sample_ids(batch) if task is not None else batch["sample_id"]
        # DDP averages the W ranks' gradients: an occurrence's share of the applied gradient is its share
        # of this rank's loss / W, so both its weight and its captured contribution are divided by W
        w = loss_weight(self.reduction, len(ids), trainer.accumulate_grad_batches) / self.world
        self._ctx = self.capture.micro_batch(ids, weight=w, loss_scale=self._scale * self.world)
        self._ctx.__enter__()
        self._step_before = step
        if self._captures:
            self._curv_inputs.append((ids, batch, w))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        group = optimizer.param_groups[0]
        wd = group.get("weight_decay", 0.0) if isinstance(optimizer, torch.optim.SGD) else 0.0
        self._lr_wd = (float(group["lr"]), float(wd))
        groups = optimizer.param_groups
        self._groups = ([float(g["lr"]) for g in groups], [float(g.get("weight_decay", 0.0)) for g in groups])
        if self._captures:  # theta_t: the parameters have not been updated yet
            step = trainer.global_step
            gen = torch.Generator().manual_seed(self.projection.seed * 1_000_003 + step)
            parts = [
                fisher_vectors(
                    pl_module.model,
                    self.capture,
                    batch,
                    w,
                    self.curvature,
                    self.fisher_samples,
                    task=getattr(pl_module, "task", None),
                    sample_ids=ids,
                    step=step,
                    generator=gen,
                )
                for ids, batch, w in self._curv_inputs
            ]
            self._curv_rec = concat_records(parts, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)
        if trainer.global_step == self._step_before:
            return  # gradient accumulation: the optimizer has not stepped yet
        step = self._step_before
        lr, wd = self._lr_wd
        clip = float(getattr(pl_module, "clip_factor", 1.0))
        if clip < 1.0:  # theta' = (1 - lr wd) theta - lr clip g: record lr' = lr clip, wd' = wd / clip
            lr, wd = lr * clip, (wd / clip if clip > 0 else 0.0)
        scaler = self._scaler(trainer)
        if scaler is not None and float(scaler.get_scale()) < self._scale:
            # AMP overflow: the scaler skipped this update, so the step changed nothing.
            skipped_ids = self.capture.discard()
            rec = None
            lr = 0.0
        else:
            rec = self.capture.collect(step)
        if rec is None:
            ids = skipped_ids
            log.warning("step %d: AMP overflow, update skipped; recorded with lr 0 and zero gradients", step)
            dims = {n: s.dim for n, s in self.capture.specs.items()}
            self._writer.write(
                step,
                ids,
                torch.zeros(len(ids), dtype=torch.float64),
                {n: torch.zeros(len(ids), d) for n, d in dims.items()},
            )
            weights = np.zeros(len(ids))
        else:
            self._writer.write_step(rec)
            ids, weights = rec.sample_ids, rec.weights.numpy()
        if self._curv_writer is not None:
            self._write_curvature(step, skipped=rec is None)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._step_rows.append(
            {
                "step": step,
                "epoch": trainer.current_epoch,
                "lr": lr,
                "weight_decay": wd,
                "batch_size": len(ids),
                "loss": float(loss.detach()) if loss is not None else float("nan"),
                "clip_factor": clip,
                "group_lr": self._groups[0],
                "group_weight_decay": self._groups[1],
            }
        )
        self._batch_rows.append(
            pl.DataFrame(
                {
                    "step": np.full(len(ids), step, dtype=np.int64),
                    "position": np.arange(len(ids), dtype=np.int64),
                    "rank": np.full(len(ids), self.rank, dtype=np.int64),
                    "sample_id": ids.numpy().astype(np.int64),
                    "weight": weights.astype(np.float64),
                }
            )
        )
        if step + 1 in self.boundaries:
            self._writer.close()
            self._writer = None
            if self._curv_writer is not None:
                self._curv_writer.close()
                self._curv_writer = None
            self._write_part(self._segment_of(step))
            self._save_checkpoint(trainer, pl_module, step + 1)
            self._saved_at = step + 1

    def _write_part(self, segment: int) -> None:
        """The trajectory rows of ``segment`` (finished, or cut short at the end of training). Several
        ranks: every rank calls it at the same point (its writers closed); their rows are gathered to rank
        0, which writes the global rows (so the part exists only once every shard of the segment does)."""
        steps, batches = self._step_rows, self._batch_rows
        self._step_rows, self._batch_rows = [], []
        if self.world > 1:
            steps, batches = self._global_rows(steps, batches)
        if self.rank != 0 or not steps:
            return
        write_parquet(pl.DataFrame(steps), self.run.trajectory_part("steps", segment))
        write_parquet(pl.concat(batches), self.run.trajectory_part("batches", segment))

    def _global_rows(self, steps: list[dict], batches: list[pl.DataFrame]) -> tuple[list[dict], list[pl.DataFrame]]:
        """The ranks' rows of the same steps gathered (a collective): each step's loss the mean of the ranks'
        (the objective DDP's averaged gradient descends), its batch the ranks' batches in rank order."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (steps, pl.concat(batches) if batches else None))
        if self.rank != 0 or not steps:
            return steps, batches
        mine = [x["step"] for x in steps]
        for r, (theirs, _) in enumerate(gathered):
            got = [x["step"] for x in theirs]
            if got != mine:
                raise CaptureError(f"rank {r} recorded steps {got[:4]}…, rank 0 steps {mine[:4]}…: ranks out of step")
        out = []
        for i, row in enumerate(steps):
            out.append(
                {
                    **row,
                    "batch_size": sum(theirs[i]["batch_size"] for theirs, _ in gathered),
                    "loss": float(np.mean([theirs[i]["loss"] for theirs, _ in gathered])),
                }
            )
        rows = pl.concat([b for _, b in gathered]).sort("step", "rank", "position")
        rows = rows.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("step").alias("position"))
        return out, [rows]

    def _write_curvature(self, step: int, skipped: bool) -> None:
        rec, inputs = self._curv_rec, self._curv_inputs
        self._curv_rec, self._curv_inputs = None, []
        if rec is None or skipped:  # AMP-skipped step (lr 0): zero vectors, zero coefficients
            ids = torch.cat([torch.as_tensor(i).cpu() for i, _, _ in inputs]) if rec is None else rec.sample_ids
            dims = {n: s.dim for n, s in self.capture.specs.items()}
            zeros = {n: torch.zeros(len(ids), d) for n, d in dims.items()}
            self._curv_writer.write(step, ids.cpu(), torch.zeros(len(ids), dtype=torch.float64), zeros)
        else:
            self._curv_writer.write_step(rec)

    # --- the end ----------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        if self._writer is not None:  # stopped early: keep what was recorded, say so
            self._writer.close()
            self._writer = None
        if self._curv_writer is not None:
            self._curv_writer.close()
            self._curv_writer = None
        if self._step_rows:
            self._write_part(self._segment_of(self._step_rows[-1]["step"]))
        if self.rank != 0:
            return
        last = merge_trajectory(self.run)
        if last != self.boundaries[-1]:
            log.warning("training stopped at step %d of %d; later segments are missing", last, self.boundaries[-1])
        self.run.update_meta(status="trained", steps_done=last, remove_keys=("process",))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._ctx is not None:
            self.capture.discard()
            self._ctx = None
        if self._writer is not None:
            self._writer.abort()  # the segment in progress leaves no file; finished ones stay
            self._writer = None
        if self._curv_writer is not None:
            self._curv_writer.abort()
            self._curv_writer = None
        if trainer.global_rank != 0:
            return  # run.json is rank 0's (and, when a rank dies, the launching process's)
        procs = getattr(trainer.strategy.launcher, "procs", None) or []
        failure = rank_failure(exception, procs, trainer.world_size)
        if failure is not None:  # the launching process: a rank died; the steps it reached are rank 0's record
            self.run.update_meta(status="failed", error=failure, remove_keys=("process",))
            return
        step = trainer.global_step
        how = "cancelled" if cancelled(exception) else "failed"
        error = f"{type(exception).__name__}: {exception}".rstrip(": ")
        self.run.update_meta(status=how, failed_at_step=step, error=error, remove_keys=("process",))
