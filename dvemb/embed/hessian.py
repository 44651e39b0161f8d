"""The exact Hessian as the embedding / direct modes' curvature (``embed.curvature: hessian``).

Every Gauss-Newton-type curvature (the empirical Fisher, the GGN) misses the Hessian's residual term; over
hundreds of steps that error compounds, and scores of early occurrences rank poorly (docs/RESULTS.md). This
curvature is the Hessian of the step's batch loss ``L_t = sum_z w_z l_z`` itself, at the replayed parameters
theta_t, seen through the store: with ``S`` the linear map from parameters to stored coordinates (a coordinate
selection for unprojected, ``subsample`` and ``rowwise`` stores; the Gaussian projection otherwise) it applies::

    H_S x = S H_t S^T x                  x: stored coordinates, [D, V] columns per block

as Hessian-vector products (one double-backward pass per chunk of columns; no matrix is formed). On an
unprojected store it is the exact Hessian, and the linearised recursions then equal the exact mode's
first-order sweep (tested). ``embed.blocks: model`` applies the whole Hessian, ``layer`` its diagonal blocks.

theta_t is recomputed segment by segment from the boundary checkpoints, like the exact mode (one segment's
parameters in memory), and each segment's replay is checked against the next recorded boundary first. The run
must be replayable (dvemb.replay); nothing extra is captured in training.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvemb.embed.adam import StoredCoordinates
from dvemb.embed.blocks import MODEL
from dvemb.embed.propagator import Curvature, Vectors
from dvemb.embed.segments import CurvatureFn
from dvemb.replay.optim import Params
from dvemb.replay.trajectory import Trajectory, check_boundary, load_trajectory
from dvemb.store.gradstore import read_projection
from dvemb.store.rundir import RunDir
from dvemb.types import StepGrads

log = logging.getLogger(__name__)
CHUNK = 1 << 24  # tangent values ([columns, parameters]) per double-backward pass: bounds the memory


class StoredHessian:
    """Hessian-vector products of a recorded run's steps in its store's coordinates."""

    def __init__(self, traj: Trajectory, coords: StoredCoordinates, segments: Sequence[int] | None = None):
        """segments: the segments whose steps may be asked for (None: all)."""
        self.traj, self.coords = traj, coords
        self.bounds = traj.boundaries
        self.segments = None if segments is None else set(segments)
        self.layers = sorted(coords.specs)
        self.dims = {n: s.dim for n, s in coords.specs.items()}
        self.params = [p for n in self.layers for p in coords.specs[n].params]
        self._held: tuple[int, list[Params]] | None = None  # (segment, theta_t of its steps)

    def theta(self, t: int) -> Params:
        """theta_t, replaying t's segment from its boundary checkpoint (checked against the next one)."""
        j = bisect.bisect_right(self.bounds, t) - 1
        if not 0 <= j < len(self.bounds) - 1:
            raise ValueError(f"step {t} outside the run's steps 0..{self.bounds[-1] - 1}")
        if self.segments is not None and j not in self.segments:
            raise ValueError(f"step {t} is in segment {j}, outside the segments {sorted(self.segments)}")
        if self._held is None or self._held[0] != j:
            a, b = self.bounds[j], self.bounds[j + 1]
            self._held = None  # free the previous segment first
            params, state, thetas = self.traj.checkpoints[a], self.traj.opt_states[a], []
            for s in range(a, b):
                thetas.append(params)
                params, state = self.traj.step(params, state, s)
            check_boundary(self.traj, b, params, state, scoring=True)
            self._held = (j, thetas)
        return self._held[1][t - self.bounds[j]]

    def curvature(self, rec: StepGrads) -> Curvature:
        """The curvature of step ``rec.step`` as a product (vectors unused)."""
        return Curvature({}, torch.empty(0), product=lambda x: self.product(rec.step, x))

    def product(self, t: int, x: Vectors) -> Vectors:
        """H_S x for columns x: ``{"model": [sum D, V]}`` (the whole Hessian, layers in sorted order) or
        layer -> [D_l, V] (each layer's diagonal block). Returns the same layout and dtype."""
        if set(x) == {MODEL}:
            cols = {n: c.T for n, c in zip(self.layers, x[MODEL].split([self.dims[n] for n in self.layers]))}
            tangents = self.coords.from_stored(cols)
            out = self._hvp(t, tangents)
            return {MODEL: torch.cat([out[n].T for n in self.layers]).to(x[MODEL].dtype)}
        # block-diagonal: every layer's columns in one batch, each tangent in its own layer's parameters only
        sizes = [x[n].shape[1] for n in x]
        own = [self.coords.from_stored({n: cols.T}) for n, cols in x.items()]  # layer i's params only
        like = self.traj.checkpoints[self.bounds[0]]
        tangents = {p: _rows([o.get(p) for o in own], sizes, like[p]) for p in self.params}
        out = self._hvp(t, tangents)
        return {n: out[n][sum(sizes[:i]) : sum(sizes[: i + 1])].T.to(x[n].dtype) for i, n in enumerate(x)}

    def _hvp(self, t: int, tangents: dict[str, torch.Tensor]) -> Vectors:
        """Stored coordinates of H_t v for each row v of ``tangents`` (parameter -> [V, *shape]): layer -> [V, D]."""
        traj = self.traj
        p = {k: v.detach().requires_grad_(k in traj.spec.group_of) for k, v in self.theta(t).items()}
        leaves = [p[k] for k in self.params]
        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
            g = torch.autograd.grad(traj.batch_loss(p, t), leaves, create_graph=True)
            v = len(next(iter(tangents.values())))
            chunk = max(1, CHUNK // sum(x.numel() for x in leaves))
            parts = []
            for i in range(0, v, chunk):
                tan = [tangents[k][i : i + chunk].to(traj.dtype) for k in self.params]
                parts.append(_batched_vjp(g, leaves, tan))
        hv = {k: torch.cat([part[i] for part in parts]) for i, k in enumerate(self.params)}
        return self.coords.to_stored(lambda k: hv[k])


def _rows(parts: list[torch.Tensor | None], sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """[sum sizes, *like.shape]: each part's rows, zeros where a part is None."""
    zeros = [like.new_zeros((s, *like.shape), dtype=torch.float64) for s in sizes]
    return torch.cat([q if q is not None else z for q, z in zip(parts, zeros)])


def _batched_vjp(
    g: Sequence[torch.Tensor], leaves: list[torch.Tensor], tangents: list[torch.Tensor]
) -> list[torch.Tensor]:
    """d<g, v>/dtheta for every row v of ``tangents`` (leaf -> [n, *shape]): one vmapped backward pass, or one
    pass per row where the model cannot be vmapped."""
    try:
        return list(torch.autograd.grad(g, leaves, tangents, retain_graph=True, is_grads_batched=True))
    except (RuntimeError, NotImplementedError) as e:
        log.debug("Hessian-vector products one by one (%s)", e)
    rows = [
        torch.autograd.grad(g, leaves, [x[i] for x in tangents], retain_graph=True) for i in range(len(tangents[0]))
    ]
    return [torch.stack([r[k] for r in rows]) for k in range(len(leaves))]


def hessian_curvature(run: RunDir, segments: Sequence[int] | None = None) -> CurvatureFn:
    """CurvatureFn of ``run``: the exact Hessian of each step in its store's coordinates (replayed lazily, one
    segment at a time). ReplayError when the run cannot be replayed exactly."""
    traj = load_trajectory(run)
    coords = StoredCoordinates(traj.net.model, read_projection(run.projection), traj.dtype)
    return StoredHessian(traj, coords, segments).curvature
