"""Resuming an interrupted training run from its last boundary checkpoint (docs/RELIABILITY.md, Resume).

At every inner segment boundary ``b`` (0 < b < T) a training run leaves, in this order: the finished
segment's gradient shard ``grads/seg-XXXX-rank-0.arrow`` and trajectory rows
``trajectory/segments/{steps,batches}-XXXX.parquet``, the model ``checkpoints/step-b`` and optimizer
state ``checkpoints/optimizer-b``, and — last, at the start of step ``b``, just before its forward
pass — ``checkpoints/resume-b.safetensors``: the RNG states (torch CPU / CUDA, numpy, python), the LR
scheduler's state and every group's LR, the AMP scaler, the loop position (epoch, batch in the epoch)
and the dtypes of the optimizer state. Every file is written atomically, so a boundary whose resume
file exists (and passes its integrity check) is complete.

A resumed run rebuilds the model from the run's recorded config, loads all of that, makes the planned
sampler skip the batches of the epoch already done (the order of epoch ``e`` is a pure function of
``(seed, e)``), sets Lightning's progress counters to the boundary and restores the RNG states right
before step ``b``'s forward pass — the point they were saved at. Everything after that point runs the
same code on the same numbers as the uninterrupted run, so the finished run's files are bit-identical.
Nothing is unpickled: safetensors and JSON only. This module plans a resume and reads / writes the
state; the Lightning callback that captures and restores it is :class:`dvemb.train.resumer.Resumer`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from dvemb.capture.fisher import captures_curvature
from dvemb.config import ConfigError, RunConfig
from dvemb.errors import DamagedFileError, DvembError, StoreError
from dvemb.store import integrity
from dvemb.store.rundir import RunDir, load_tensors, save_tensors

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SEP = "::"  # "{parameter}::{state key}", as in checkpoints/optimizer-XXXXXX.safetensors


class RunBusyError(DvembError):
    """The run's training process is still alive: it cannot be resumed (or overwritten) now."""


# --- the training process ----------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux /proc; None elsewhere or when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def this_process() -> dict:
    """``{"pid", "host", "start"}`` of this process, recorded in run.json while it trains."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def process_alive(proc: dict | None) -> bool | None:
    """Whether the recorded training process still runs: True / False, None = cannot tell (other host)."""
    if not proc or proc.get("host") != socket.gethostname():
        return None
    pid = int(proc["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _start_time(pid)
    return start is None or proc.get("start") is None or start == proc["start"]  # a reused pid is not it


# --- RNG -------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG state: tensors (torch CPU / CUDA bytes, numpy MT19937 keys, python MT words) + JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, words, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(words, dtype=torch.int64)
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(int(w) for w in tensors["rng.python"].tolist()), p["gauss_next"]))


# --- the state at a boundary -----------------------------------------------------------------------
@dataclass
class ResumeState:
    """What ``checkpoints/resume-XXXXXX.safetensors`` holds (besides the model and optimizer files).

    step: global optimizer step b about to run; epoch: its epoch; batch: index of its first micro-batch
    in the epoch; micro_batches: micro-batches done in all; group_lr: each param group's LR for step b;
    schedulers / scaler: their ``state_dict()`` (JSON); optimizer_state: ``{"{param}::{key}": {"dtype",
    "device": "param" | "cpu"}}`` (or ``{"float": true}``) of each optimizer-state entry."""

    step: int
    epoch: int
    batch: int
    micro_batches: int
    group_lr: list[float]
    schedulers: list[dict]
    scaler: dict | None
    optimizer_state: dict[str, dict]
    rng: dict
    rng_tensors: dict[str, torch.Tensor]

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in vars(self).items() if k != "rng_tensors"}}


def json_state(obj, what: str) -> dict:
    """``obj.state_dict()`` as plain JSON (StoreError naming ``what`` when it holds anything else)."""
    state = obj.state_dict()
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as e:
        raise StoreError(f"cannot record the {what} for resuming: its state_dict is not plain JSON ({e})") from None


def save_state(run: RunDir, state: ResumeState) -> None:
    """``checkpoints/resume-XXXXXX.safetensors`` (RNG tensors; the rest as JSON in its metadata)."""
    save_tensors(run.resume_state(state.step), state.rng_tensors, metadata={"resume": json.dumps(state.to_json())})


def load_state(run: RunDir, step: int) -> ResumeState:
    """The resume state of boundary ``step`` (DamagedFileError naming the file when unreadable)."""
    path = run.resume_state(step)
    tensors = load_tensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            d = json.loads((f.metadata() or {})["resume"])
        if d.pop("schema_version") != SCHEMA_VERSION:
            raise ValueError("unknown schema_version")
        return ResumeState(**d, rng_tensors=tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedFileError(f"{path}: damaged — not a dvemb resume state ({type(e).__name__}: {e})") from None


# --- planning a resume -----------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where a run continues: ``step`` (an inner boundary) with its ``state``; ``done``: training is complete."""

    step: int
    state: ResumeState | None = None
    done: bool = False


def _normalised(config: dict) -> dict:
    c = json.loads(json.dumps(config))
    c.get("embed", {}).pop("segments", None)  # clamped to the number of steps at training start
    return c


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {json.dumps(x)} in run.json, {json.dumps(y)} given")
    return out


def check_same_config(run: RunDir, cfg: RunConfig) -> None:
    """ConfigError listing the fields where ``cfg`` differs from the config the run was started with."""
    meta = run.meta()
    recorded = meta.get("config") or {}
    given = cfg.model_dump(mode="json")
    diff = _differences(_normalised(recorded), _normalised(given))
    rec_seg = meta.get("embed_segments_requested", recorded.get("embed", {}).get("segments"))
    if given.get("embed", {}).get("segments") not in (rec_seg, recorded.get("embed", {}).get("segments")):
        diff.append(f"embed.segments: {rec_seg} in run.json, {given['embed']['segments']} given")
    if diff:
        raise ConfigError(
            f"{run.root}: cannot resume with a config other than the run's own ({'; '.join(diff[:6])}"
            f"{f' and {len(diff) - 6} more' if len(diff) > 6 else ''}); resume with `dvemb run --out {run.root} "
            "--resume` (the config in run.json) or start a new run"
        )


def _segment_files(run: RunDir, j: int, curvature: bool) -> list[Path]:
    files = [*run.grad_shards(j), run.trajectory_part("steps", j), run.trajectory_part("batches", j)]
    if curvature:
        from dvemb.capture.fisher import curvature_path

        files += [curvature_path(run, j, r) for r in range(run.world_size)]
    return files


def data_files(run: RunDir) -> list[Path]:
    return [p for p in (run.data("train"), run.data("val"), run.data("test"), run.corrupted) if p.exists()]


def boundary_files(run: RunDir, b: int, curvature: bool) -> list[Path]:
    """The files a run resumed at inner boundary ``b`` keeps and needs."""
    bounds = run.boundaries
    j = bounds.index(b)
    return [
        run.resume_state(b),
        run.checkpoint(b),
        run.optimizer_state(b),
        *[run.checkpoint(s) for s in bounds[:j]],
        *[p for s in range(j) for p in _segment_files(run, s, curvature)],
    ]


def last_boundary(run: RunDir, curvature: bool = False, deep: bool = False) -> int | None:
    """The latest inner boundary whose files are all present and intact (None: none; resume = start over)."""
    bounds = run.boundaries
    for b in reversed(bounds[1:-1]):
        files = boundary_files(run, b, curvature)
        if all(p.exists() for p in files) and not integrity.damaged(run.root, files + data_files(run), deep):
            return b
    return None


def finished_training(run: RunDir) -> bool:
    """Training got to its end: every file of the train stage is there (a finished training, maybe killed
    before run.json said so), or run.json says trained / diverged. DamagedFileError / StoreError naming
    the files when such a training's files are damaged (sha256) or missing: only ``--force`` redoes it."""
    expected = run.expected("train")
    missing = [p for p in expected if not p.exists()]
    status = run.meta().get("status")
    if missing and status not in ("trained", "diverged"):
        return False
    if missing:
        names = ", ".join(str(p.relative_to(run.root)) for p in missing[:4])
        raise StoreError(
            f"{run.root}: training finished (status {status!r}) but {names} "
            f"{'is' if len(missing) == 1 else 'are'} missing; nothing to resume — train it again with --force"
        )
    bad = integrity.damaged(run.root, expected, deep=True)
    if bad:
        names = "; ".join(f"{p.relative_to(run.root)}: {why}" for p, why in bad.items())
        raise DamagedFileError(
            f"{run.root}: training finished but its files are damaged ({names}); train it again with --force"
        )
    return True


def _all_segments_done(run: RunDir) -> bool:
    """Every segment's gradients and trajectory part and every checkpoint are there (merge pending)."""
    bounds = run.boundaries
    curvature = captures_curvature((run.meta().get("config") or {}).get("embed", {}).get("curvature", "empirical"))
    files = [run.checkpoint(s) for s in bounds]
    files += [p for j in range(len(bounds) - 1) for p in _segment_files(run, j, curvature)]
    return all(p.exists() for p in files) and not integrity.damaged(run.root, files, deep=True)


def _remove(run: RunDir, paths: list[Path], why: str) -> None:
    gone = [p for p in paths if p.exists()]
    for p in gone:
        p.unlink()
    if gone:
        integrity.forget(gone)
        names = ", ".join(str(p.relative_to(run.root)) for p in gone)
        log.info("resume: removed %d file(s) %s: %s", len(gone), why, names)


def _later_files(run: RunDir, b: int) -> list[Path]:
    """Files of the training after boundary ``b`` (and everything computed from them) — redone on resume."""
    bounds = run.boundaries
    j = bounds.index(b)
    later_steps = {s for s in bounds if s > b}
    out = [p for p in (run.root / "checkpoints").glob("*.safetensors") if _step_of(p) in later_steps]
    out += [p for s in range(j, len(bounds) - 1) for p in _segment_files(run, s, True)]
    out += [run.steps, run.batches, run.occurrences, run.samples, run.curated, run.plan, run.report]
    out += [p for s in range(j, len(bounds) - 1) for p in (run.embeddings(s), run.propagator(s))]
    return out


def _step_of(path: Path) -> int | None:
    try:
        return int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def plan_resume(run: RunDir, cfg: RunConfig) -> ResumePoint | None:
    """Where ``run`` continues with ``cfg`` (None: nothing to resume — no run.json, or training never
    reached an inner boundary; the caller starts it over). Refuses another config and a run whose
    training process is still alive; removes the temporary files of killed writers and every file
    after the chosen boundary (the manifest forgets them)."""
    if not run.run_json.exists():
        return None
    meta = run.meta()
    check_same_config(run, cfg)
    if meta.get("status") in ("preparing", "training") and process_alive(meta.get("process")):
        p = meta["process"]
        raise RunBusyError(f"{run.root}: still training (pid {p['pid']} on {p['host']}); stop it or wait for it")
    leftovers = integrity.temp_leftovers(run.root)
    for p in leftovers:
        p.unlink(missing_ok=True)
    if leftovers:
        log.info("resume: removed %d temporary file(s) of interrupted writes", len(leftovers))
    if "boundaries" not in meta:
        return None
    if finished_training(run):
        if meta.get("status") not in ("trained", "diverged"):  # killed after its last file was written
            steps = run.boundaries[-1]
            run.update_meta(status="trained", steps_done=steps, remove_keys=("process", "error", "failed_at_step"))
        return ResumePoint(run.boundaries[-1], done=True)
    if _all_segments_done(run):  # killed while merging the trajectory at the very end
        from dvemb.capture.callback import merge_trajectory

        steps = merge_trajectory(run)
        run.update_meta(status="trained", steps_done=steps, remove_keys=("process", "error", "failed_at_step"))
        return ResumePoint(run.boundaries[-1], done=True)
    curvature = captures_curvature((meta.get("config") or {}).get("embed", {}).get("curvature", "empirical"))
    b = last_boundary(run, curvature, deep=True)
    if b is None:
        return None
    _remove(run, _later_files(run, b), f"written after step {b}")
    return ResumePoint(b, load_state(run, b))


# --- what `dvemb status` says ----------------------------------------------------------------------
def resume_command(out: str | os.PathLike[str], command: str = "run") -> str:
    """The command that continues the run in ``out`` (``run``: every stage; ``train``: training only)."""
    return f"dvemb {command} --out {out} --resume" + (" --engine local" if command == "run" else "")


def status_lines(run: RunDir, meta: dict) -> list[str]:
    """What state an unfinished training is in, and how to continue it (for ``dvemb status``)."""
    status, proc = meta.get("status"), meta.get("process")
    if status not in ("training", "failed", "cancelled", "preparing") or "boundaries" not in meta:
        if status == "preparing" and proc and process_alive(proc) is False:
            return [
                f"the run stopped while preparing its data (pid {proc['pid']} is gone); continue with: "
                f"{resume_command(run.root)}"
            ]
        return []
    lines = []
    if status == "training":
        alive = process_alive(proc)
        if alive:
            return [f"training in progress: pid {proc['pid']} on {proc['host']}"]
        if alive is None:
            where = f"pid {proc['pid']} on host {proc['host']}" if proc else "an unknown process"
            lines.append(f"training by {where}: cannot tell from here whether it still runs; if it stopped:")
        else:
            lines.append(f"training was killed: its process (pid {proc['pid']}) is gone")
    curvature = captures_curvature((meta.get("config") or {}).get("embed", {}).get("curvature", "empirical"))
    b = last_boundary(run, curvature)
    total = run.boundaries[-1]
    at = f"step {b} of {total}" if b is not None else f"none after step 0 of {total} (resuming starts training over)"
    lines.append(f"last boundary checkpoint: {at}; continue with: {resume_command(run.root)}")
    return lines
