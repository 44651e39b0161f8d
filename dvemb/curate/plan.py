"""The curation plan (curation/plan.json): what the next run trains on and how it picks its batches.

Steps outside every window draw uniformly (the ordinary seeded epoch permutation). Inside a window
the mode says how the step's batch is formed:

* ``ordered``  — the next B rows of a queue sorted by prior value (most valuable first);
* ``prior``    — from a pool of ``pool_factor`` x B uniform candidates keep the B of highest prior value;
* ``online``   — same pool, keep the B whose projected gradient aligns best with the validation gradient
  at the current parameters (computed during the next run with the GradientCapture hooks).

With ``stratify`` the B kept rows keep each label's share of the pool (classification), so selection
cannot shift the label distribution: values differ systematically between classes, and an unstratified
top-B over-samples the classes with the highest values.

Windows are in steps of the *source* run; with ``rescale`` (default) the sampler maps them
proportionally onto the next run's length (the curated table is usually smaller), and clips them
to it either way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dvemb.score.values import Phases

Mode = Literal["uniform", "ordered", "prior", "online"]
MODES: tuple[str, ...] = ("uniform", "ordered", "prior", "online")


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    mode: Mode
    phase: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.stop < self.start:
            raise ValueError(f"window [{self.start}, {self.stop}) ends before it starts")
        return self


class SelectionPlan(BaseModel):
    """curation/plan.json. ``n_train`` / ``n_kept`` / ``n_dropped`` / ``order`` describe the filter."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    source_run: str | None = None
    source_total_steps: int = Field(ge=0)
    phases: Phases | None = None
    policy: dict = Field(default_factory=dict)
    n_train: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    order: str = "value descending"
    windows: list[Window] = Field(default_factory=list)
    pool_factor: int = Field(4, ge=1)
    stratify: bool = False
    value_column: str = "prior_value"
    val_every: int = Field(1, ge=1)
    val_samples: int = Field(512, ge=1)
    rescale: bool = True

    @model_validator(mode="after")
    def _disjoint(self) -> SelectionPlan:
        spans = sorted((w.start, w.stop) for w in self.windows if w.stop > w.start)
        for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
            if b0 < a1:
                raise ValueError(f"plan windows [{a0}, {a1}) and [{b0}, {b1}) overlap")
        return self

    def step_modes(self, total_steps: int) -> np.ndarray:
        """Mode index (into ``MODES``) of every step of a run of ``total_steps`` steps, int8 [total_steps]."""
        modes = np.zeros(total_steps, dtype=np.int8)
        scale = total_steps / self.source_total_steps if self.rescale and self.source_total_steps else 1.0
        for w in self.windows:
            a = min(total_steps, round(w.start * scale))
            b = min(total_steps, round(w.stop * scale))
            modes[a:b] = MODES.index(w.mode)
        return modes

    @property
    def uses(self) -> set[str]:
        return {w.mode for w in self.windows if w.stop > w.start}


def plan_windows(
    phases: Phases, reorder: str, select: str, select_phases: list[str], budget: float | None = None
) -> list[Window]:
    """Windows from the policy: selection in ``select_phases``; reorder in the early phase where not selecting.

    Selection takes precedence over reordering where both apply. ``budget``: at most this fraction of
    the steps select; each selection window then shrinks in proportion to its length, keeping its
    outer end (early keeps step 0, late keeps the last step, middle its centre).
    """
    spans = {p: phases.window(p) for p in ("early", "middle", "late")}
    selected = [p for p in spans if select != "none" and p in select_phases and spans[p][1] > spans[p][0]]
    if budget is not None and selected:
        spans |= _trimmed({p: spans[p] for p in selected}, int(budget * phases.total_steps))
    out = []
    for p, (a, b) in spans.items():
        if b <= a:
            continue
        if p in selected:
            out.append(Window(start=a, stop=b, mode=select, phase=p))
        elif reorder == "early" and p == "early":
            out.append(Window(start=a, stop=b, mode="ordered", phase=p))
    return out


def _trimmed(spans: dict[str, tuple[int, int]], allowed: int) -> dict[str, tuple[int, int]]:
    """Shrink the windows to ``allowed`` steps in all, in proportion to their lengths (remainder to the last)."""
    lengths = {p: b - a for p, (a, b) in spans.items()}
    total = sum(lengths.values())
    if total <= allowed:
        return spans
    keep = {p: n * allowed // total for p, n in lengths.items()}
    keep[list(spans)[-1]] += allowed - sum(keep.values())
    out = {}
    for p, (a, b) in spans.items():
        n = keep[p]
        if p == "early":
            out[p] = (a, a + n)
        elif p == "late":
            out[p] = (b - n, b)
        else:
            c = a + (b - a - n) // 2
            out[p] = (c, c + n)
    return out
