"""The run directory (docs/RUN_DIRECTORY.md): one place that knows every path, and what a stage left missing."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dvemb.config import writes_embeddings
from dvemb.errors import DamagedFileError, DvembError, RunPathError, StoreError
from dvemb.store import integrity
from dvemb.store.atomic import atomic_path, write_json


class RunExistsError(DvembError):
    """The run directory already holds results and overwriting was not asked for."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        # resolved: ``missing/../run`` is ``run``, so the overwrite guard sees the folder really written
        object.__setattr__(self, "root", Path(root).resolve())

    # --- paths ------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def data(self, split: str) -> Path:
        return self.root / "data" / f"{split}.parquet"

    @property
    def corrupted(self) -> Path:
        return self.root / "data" / "corrupted.parquet"

    @property
    def steps(self) -> Path:
        return self.root / "trajectory" / "steps.parquet"

    @property
    def batches(self) -> Path:
        return self.root / "trajectory" / "batches.parquet"

    def checkpoint(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step-{step:06d}.safetensors"

    def optimizer_state(self, step: int) -> Path:
        """Optimizer state at boundary ``step``: keys ``"{parameter}::{state key}"``."""
        return self.root / "checkpoints" / f"optimizer-{step:06d}.safetensors"

    def resume_state(self, step: int) -> Path:
        """What else a run resumed at inner boundary ``step`` needs: RNG states (torch, numpy, python),
        the LR scheduler, the loop position (epoch, batch), optimizer-state dtypes (safetensors + JSON
        metadata; dvemb.train.resume). Written last at the boundary: its presence marks the boundary complete."""
        return self.root / "checkpoints" / f"resume-{step:06d}.safetensors"

    def trajectory_part(self, kind: str, segment: int) -> Path:
        """``steps`` / ``batches`` rows of one finished segment (merged into trajectory/KIND.parquet at the end)."""
        return self.root / "trajectory" / "segments" / f"{kind}-{segment:04d}.parquet"

    @property
    def projection(self) -> Path:
        return self.root / "grads" / "projection.json"

    def grads(self, segment: int, rank: int = 0) -> Path:
        return self.root / "grads" / f"seg-{segment:04d}-rank-{rank}.arrow"

    def grad_shards(self, segment: int) -> list[Path]:
        """Every rank's gradient shard of ``segment`` (one file for a one-process run)."""
        return [self.grads(segment, r) for r in range(self.world_size)]

    def embeddings(self, segment: int, rank: int = 0) -> Path:
        return self.root / "embeddings" / f"seg-{segment:04d}-rank-{rank}.arrow"

    def propagator(self, segment: int) -> Path:
        return self.root / "embeddings" / f"seg-{segment:04d}-propagator.safetensors"

    @property
    def occurrences(self) -> Path:
        return self.root / "scores" / "occurrences.parquet"

    @property
    def samples(self) -> Path:
        return self.root / "scores" / "samples.parquet"

    @property
    def curated(self) -> Path:
        return self.root / "curation" / "curated.parquet"

    @property
    def plan(self) -> Path:
        return self.root / "curation" / "plan.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    # --- lifecycle ----------------------------------------------------------------------
    def create(self, force: bool = False) -> None:
        """Make the folder. A non-empty one is emptied only if it is a dvemb run directory (holds
        ``run.json``, does not hold the working directory) and either ``force`` is given or it never
        got to training (a failed data step: no checkpoint, no gradient). Anything else is refused."""
        if self.root.exists() and not self.root.is_dir():
            raise RunPathError(f"{self.root}: exists and is not a folder; choose another --out")
        if self.root.is_dir() and any(self.root.iterdir()):
            if not self.run_json.is_file():
                raise RunPathError(
                    f"{self.root}: folder exists, is not empty and is not a dvemb run directory (no run.json); "
                    "dvemb never deletes it — choose another --out"
                )
            if Path.cwd().resolve().is_relative_to(self.root):
                raise RunPathError(f"{self.root}: holds the working directory; refusing to empty it")
            if not (force or self._never_trained()):
                raise RunExistsError(f"{self.root}: run directory exists and is not empty; pass --force to overwrite")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _never_trained(self) -> bool:
        """The folder holds no checkpoint and no gradient: a run stopped before training (reusable)."""
        return not any(p.is_file() for d in ("checkpoints", "grads") for p in (self.root / d).glob("*"))

    def meta(self) -> dict:
        """run.json as a dict (StoreError when absent, DamagedFileError naming it when unreadable)."""
        if not self.run_json.exists():
            raise StoreError(f"{self.root}: no run.json — not a dvemb run directory (or training never started)")
        try:
            meta = json.loads(self.run_json.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DamagedFileError(f"{self.run_json}: damaged — not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DamagedFileError(f"{self.run_json}: damaged — holds a {type(meta).__name__}, not a JSON object")
        return meta

    def update_meta(self, *, remove_keys: tuple[str, ...] = (), **fields) -> None:
        """Set ``fields`` in run.json (created if absent) and remove the keys in ``remove_keys``."""
        meta = self.meta() if self.run_json.exists() else {}
        meta.update(fields)
        for key in remove_keys:
            meta.pop(key, None)
        write_json(self.run_json, meta)

    @property
    def world_size(self) -> int:
        """Training processes (DDP ranks) that wrote the run, as recorded in run.json (1 when not recorded)."""
        return int(self.meta().get("world_size", 1)) if self.run_json.exists() else 1

    @property
    def boundaries(self) -> list[int]:
        """Segment boundaries 0 = b_0 < … < b_K = T, recorded at training time."""
        meta = self.meta()
        if "boundaries" not in meta:
            why = f": {meta['error']}" if meta.get("error") else ""
            raise StoreError(
                f"{self.run_json}: no segment boundaries — training never started "
                f"(status {meta.get('status', 'unknown')!r}{why})"
            )
        return list(meta["boundaries"])

    def expected(self, stage: str) -> list[Path]:
        """The files a finished ``stage`` (train / embed / score / curate) leaves behind: none for embed when
        the recorded ``embed.write`` / ``score.mode`` write no embeddings; never a file ``dvemb gc`` dropped."""
        if stage == "train":
            b = self.boundaries
            gone = set((self.meta().get("gc") or {}).get("dropped") or {})
            files = [
                self.run_json,
                self.data("train"),
                self.data("val"),
                self.steps,
                self.batches,
                self.projection,
                *[self.checkpoint(s) for s in b],
                *[p for j in range(len(b) - 1) for p in self.grad_shards(j)],
            ]
            return [p for p in files if p.relative_to(self.root).as_posix() not in gone]
        if stage == "embed":
            k = len(self.boundaries) - 1
            cfg = self.meta().get("config") or {}
            if not writes_embeddings(
                (cfg.get("embed") or {}).get("write", "auto"), (cfg.get("score") or {}).get("mode", "exact")
            ):
                return []
            return [p for j in range(k) for p in (self.embeddings(j), self.propagator(j))]
        if stage == "score":
            return [self.occurrences, self.samples]
        if stage == "curate":
            return [self.curated, self.plan]
        raise ValueError(f"unknown stage {stage!r}")

    def require(self, stage: str) -> None:
        """Raise StoreError listing what an earlier ``stage`` should have written but did not, or
        DamagedFileError naming each of its files that is unreadable or differs in size from the manifest."""
        try:
            expected = self.expected(stage)
        except DamagedFileError:
            raise
        except StoreError as e:
            raise StoreError(f"stage {stage!r} has not run: {e}") from None
        missing = [p for p in expected if not p.exists()]
        if missing:
            names = ", ".join(str(p.relative_to(self.root)) for p in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise StoreError(f"{self.root}: stage {stage!r} is incomplete; missing {names}{more}")
        integrity.check_files(self.root, expected)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (contiguous CPU copies; a tensor sharing memory with an earlier one, e.g. a
    weight tied to another, is stored as its own copy under its own name). ``metadata``: at most one key —
    safetensors writes several in a per-process random order, and files are compared byte for byte (a resumed run
    against an uninterrupted one); put several values into one JSON string."""
    if metadata is not None and len(metadata) > 1:
        raise ValueError(f"safetensors metadata {sorted(metadata)}: one key, a JSON string for several values")
    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (StoreError when missing, DamagedFileError naming it when unreadable)."""
    if not path.exists():
        raise StoreError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DamagedFileError(f"{path}: damaged — not a readable safetensors file ({e})") from None
