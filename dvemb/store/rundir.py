"""The run directory (DESIGN §3): one place that knows every path, and what a stage left missing."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dvemb.errors import DvembError, StoreError
from dvemb.store.atomic import atomic_path, write_json


class RunExistsError(DvembError):
    """The run directory already holds results and overwriting was not asked for."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

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

    @property
    def projection(self) -> Path:
        return self.root / "grads" / "projection.json"

    def grads(self, segment: int, rank: int = 0) -> Path:
        return self.root / "grads" / f"seg-{segment:04d}-rank-{rank}.arrow"

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
        """Make the folder; refuse to reuse one that holds files unless ``force`` (which empties it)."""
        if self.root.exists() and any(self.root.iterdir()):
            if not force:
                raise RunExistsError(f"{self.root}: run directory exists and is not empty; pass --force to overwrite")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def meta(self) -> dict:
        if not self.run_json.exists():
            raise StoreError(f"{self.root}: no run.json — not a dvemb run directory (or training never started)")
        return json.loads(self.run_json.read_text())

    def update_meta(self, **fields) -> None:
        meta = self.meta() if self.run_json.exists() else {}
        meta.update(fields)
        write_json(self.run_json, meta)

    @property
    def boundaries(self) -> list[int]:
        """Segment boundaries 0 = b_0 < … < b_K = T, recorded at training time."""
        return list(self.meta()["boundaries"])

    def expected(self, stage: str) -> list[Path]:
        """The files a finished ``stage`` (train / embed / score / curate) leaves behind."""
        if stage == "train":
            b = self.boundaries
            return [
                self.run_json,
                self.data("train"),
                self.data("val"),
                self.steps,
                self.batches,
                self.projection,
                *[self.checkpoint(s) for s in b],
                *[self.grads(j) for j in range(len(b) - 1)],
            ]
        if stage == "embed":
            k = len(self.boundaries) - 1
            return [p for j in range(k) for p in (self.embeddings(j), self.propagator(j))]
        if stage == "score":
            return [self.occurrences, self.samples]
        if stage == "curate":
            return [self.curated, self.plan]
        raise ValueError(f"unknown stage {stage!r}")

    def require(self, stage: str) -> None:
        """Raise StoreError listing what an earlier ``stage`` should have written but did not."""
        try:
            missing = [p for p in self.expected(stage) if not p.exists()]
        except StoreError as e:
            raise StoreError(f"stage {stage!r} has not run: {e}") from None
        if missing:
            names = ", ".join(str(p.relative_to(self.root)) for p in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise StoreError(f"{self.root}: stage {stage!r} is incomplete; missing {names}{more}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (contiguous CPU copies)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise StoreError(f"{path}: missing")
    return load_file(str(path))
