"""The curvature of the backward recursion, per step: the empirical Fisher (from the stored gradients
themselves), the true Fisher / GGN vectors captured while training (dvemb.capture.fisher), or the exact Hessian
in the store's coordinates, from the replayed trajectory (dvemb.embed.hessian).
"""

from __future__ import annotations

from collections.abc import Sequence

from dvemb.capture.fisher import check_curvature, curvature_path
from dvemb.embed.propagator import Curvature
from dvemb.embed.segments import CurvatureFn
from dvemb.errors import StoreError
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.types import StepGrads


def as_curvature(rec: StepGrads) -> Curvature:
    """A stored curvature record (vectors + coef in ``weights``) as the propagator's Curvature."""
    return Curvature(rec.grads, rec.weights)


def stored_curvature(run: RunDir, segments: Sequence[int]) -> CurvatureFn:
    """CurvatureFn reading the stored vectors of ``segments`` (raises StoreError if they were not captured)."""
    b = run.boundaries
    by_step: dict[int, StepGrads] = {}
    for j in segments:
        path = curvature_path(run, j)
        if not path.exists():
            raise StoreError(
                f"{path}: no curvature vectors — train with embed.curvature=fisher|fisher_mc to capture them"
            )
        for rec in read_segment(path, expected_steps=range(b[j], b[j + 1]), kind="curvature"):
            by_step[rec.step] = rec

    def fn(rec: StepGrads) -> Curvature:
        if rec.step not in by_step:
            raise StoreError(f"{run.root}: no curvature vectors for step {rec.step}")
        return as_curvature(by_step[rec.step])

    return fn


def recorded_curvature(run: RunDir) -> str:
    """The curvature named in the run's recorded config (``empirical`` when absent)."""
    try:
        cfg = run.meta().get("config") or {}
    except StoreError:
        return "empirical"
    return check_curvature((cfg.get("embed") or {}).get("curvature", "empirical"))


def curvature_fn(run: RunDir, name: str | None, segments: Sequence[int]) -> CurvatureFn | None:
    """None for the empirical Fisher (the propagator's default); the exact Hessian's CurvatureFn (replaying the
    run, dvemb.embed.hessian); else the stored vectors' CurvatureFn."""
    name = recorded_curvature(run) if name is None else check_curvature(name)
    if name == "hessian":
        from dvemb.embed.hessian import hessian_curvature  # the replay's readers load only where it is used

        return hessian_curvature(run, segments)
    return None if name == "empirical" else stored_curvature(run, segments)
