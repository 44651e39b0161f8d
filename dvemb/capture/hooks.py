"""Layer hooks that record per-sample projected gradients without per-sample backward passes.

For every captured layer (a Linear by default; see :mod:`dvemb.capture.layers` for the kinds) a
forward hook keeps the layer input ``a`` and attaches a tensor hook to the output; when autograd
delivers ``ds = dL/d(output)`` the hook forms the projected per-sample gradient, e.g. for a
Linear ``sum_tokens (P_s ds)(P_a a)^T``. ``L`` is whatever loss you call ``backward`` on,
so the recorded vector is the per-sample *contribution* ``g_z = w_z grad l_z`` (docs/DESIGN.md §2),
with the AMP loss scale divided out. You tell the capture ``w_z`` (see :func:`loss_weight`).

Usage (one optimizer step, two accumulation micro-batches, mean reduction)::

    cap = GradientCapture(model, ProjectionConfig(k_a=32, k_s=32))
    for ids, x, y in micro_batches:
        with cap.micro_batch(ids, weight=loss_weight("mean", len(ids), accumulation=2)):
            (loss_fn(model(x), y) / 2).backward()
    record = cap.collect(step=t)   # StepGrads: sample_ids [B], weights [B], grads {layer: [B, D]}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dvemb.capture.layers import Member, Selection, select_layers
from dvemb.capture.projection import DTYPES, Projector, layer_seed
from dvemb.errors import CaptureError, NonFiniteGradientError
from dvemb.types import LayerProjection, ProjectionConfig, StepGrads


def loss_weight(reduction: str, batch_size: int, accumulation: int = 1, loss_scale: float = 1.0) -> float:
    """w_z for a micro-batch: 1/(B * accumulation) for "mean", 1/accumulation for "sum".

    ``loss_scale`` is any extra factor you multiply the loss by yourself (not AMP's scaler).
    """
    if reduction == "mean":
        return loss_scale / (batch_size * accumulation)
    if reduction == "sum":
        return loss_scale / accumulation
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def layer_projections(
    selection: Selection, cfg: ProjectionConfig, param_names: dict[int, str] | None = None
) -> dict[str, LayerProjection]:
    """The recorded projection of every captured block (d_in includes the bias column where there is one).

    param_names: id(parameter) -> name (default: the names the blocks' modules give them).
    """
    if cfg.kind == "elementwise" and (cfg.k_a is None or cfg.k_s is None):
        raise ValueError("capture.kind 'elementwise' needs k_a and k_s (the sketch has k_a * k_s dimensions)")
    elementwise = cfg.kind == "elementwise"  # the sketch keeps k_a * k_s dims even where k >= d
    specs = {}
    for name, members in selection.blocks.items():
        first = members[0]
        d_in, d_out, bias = first.kind.dims(first.module)
        params = {}
        for m in members:
            for local, p in m.module.named_parameters(recurse=False):
                params.setdefault(id(p), (param_names or {}).get(id(p), f"{m.name}.{local}"))
        specs[name] = LayerProjection(
            d_in=d_in,
            d_out=d_out,
            k_a=cfg.k_a if elementwise else min(cfg.k_a or d_in, d_in),
            k_s=cfg.k_s if elementwise else min(cfg.k_s or d_out, d_out),
            seed=layer_seed(cfg.seed, name),
            kind=cfg.kind,
            layer=first.kind.name,
            bias=bias,
            params=tuple(params.values()),
        )
    return specs


class LayerProjector:
    """A captured block's Projector bound to its module(s): per-sample gradients from what the hooks see."""

    def __init__(self, projector: Projector, members: list[Member]):
        self.projector, self.members = projector, members
        self.spec = projector.spec

    def per_sample(self, x: torch.Tensor, ds: torch.Tensor, member: Member | None = None) -> torch.Tensor:
        """x: the layer input as its forward hook saw it (ids for an embedding); ds: the gradient w.r.t.
        its output -> [B, dim]. ``member``: which module of a tied block made the call (default: told
        apart by the input, ids or floating point)."""
        if member is None:
            member = self.members[0]
            if len(self.members) > 1:
                ids = not x.is_floating_point()
                member = next((m for m in self.members if m.kind.takes_ids == ids), None)
                if member is None:
                    names = [m.name for m in self.members]
                    raise CaptureError(f"layers {names}: none takes {'ids' if ids else 'a floating-point'} input")
        return member.kind.per_sample(self.projector, member.module, x, ds, member.swap)

    def project_matrix(self, grad_w: torch.Tensor) -> torch.Tensor:
        """A full [d_out, d_in] gradient (bias column included) -> flattened projected [dim]."""
        return self.projector.project_matrices(grad_w)

    def project_matrices(self, grad_w: torch.Tensor) -> torch.Tensor:
        """Full [..., d_out, d_in] gradients -> [..., dim]."""
        return self.projector.project_matrices(grad_w)

    def grad_matrix(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """G [..., d_out, d_in] of the block from parameter gradients keyed by parameter name (e.g.
        ``model.named_parameters()`` names, as torch.func returns them)."""
        first = self.members[0]
        local = {
            lname: grads[pname]
            for pname, (lname, _) in zip(self.spec.params, first.module.named_parameters(recurse=False))
        }
        return first.kind.grad_matrix(first.module, local)


class GradientCapture:
    """Records per-sample projected gradients of the selected layers of ``model``.

    layers: ``None`` = every nn.Linear, else kinds / globs / names (dvemb.capture.layers).
    ``tracked``: block name -> its (first) module; ``specs`` / ``projectors``: per block;
    ``skipped``: modules a glob matched that are not captured (name -> why); ``hooked``: every
    (block, module) pair the hooks sit on (tied partners included).
    """

    def __init__(
        self,
        model: nn.Module,
        projection: ProjectionConfig = ProjectionConfig(),
        layers: Sequence[str] | str | None = None,
        device: torch.device | str | None = None,
    ):
        self.model = model
        self.config = projection
        self.dtype = DTYPES[projection.dtype]
        selection = select_layers(model, layers)
        self.blocks = selection.blocks
        self.skipped = selection.skipped
        self.tracked = {n: ms[0].module for n, ms in self.blocks.items()}
        self.hooked = [(n, m.module) for n, ms in self.blocks.items() for m in ms]
        names = {id(p): n for n, p in model.named_parameters()}
        self.specs = layer_projections(selection, projection, names)
        dev = device or next(model.parameters()).device
        self.projectors = {
            n: LayerProjector(Projector(s, self.dtype, dev), self.blocks[n]) for n, s in self.specs.items()
        }
        self._handles = [
            m.module.register_forward_hook(self._forward_hook(n, m)) for n, ms in self.blocks.items() for m in ms
        ]
        self._active: tuple[int, float] | None = None  # (batch size, 1 / loss scale) while recording
        self._micro: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def _forward_hook(self, name: str, member: Member):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._active is None or not output.requires_grad:
                return
            a = inputs[0].detach()
            batch, inv_scale = self._active
            if a.dim() == 0 or a.shape[0] != batch:
                raise CaptureError(
                    f"layer {member.name!r}: input batch dimension {tuple(a.shape)[:1]} != {batch} sample ids; "
                    "a captured layer must see each sample's own input along dim 0 ([B, ...]); a layer whose "
                    "output is broadcast over the batch (e.g. a position embedding) has no per-sample gradient"
                )

            def on_grad(ds: torch.Tensor) -> None:
                g = self.projectors[name].per_sample(a, ds, member)
                if inv_scale != 1.0:
                    g = g * inv_scale
                prev = self._micro.get(name)  # a layer called twice (weight sharing) sums its calls
                self._micro[name] = g if prev is None else prev + g

            output.register_hook(on_grad)

        return hook

    @contextmanager
    def micro_batch(
        self,
        sample_ids: torch.Tensor | Sequence[int],
        weight: float | torch.Tensor,
        loss_scale: float = 1.0,
    ) -> Iterator[None]:
        """Record the forward+backward of one micro-batch run inside this block.

        weight: w_z (scalar or [B]) — the coefficient of each sample's loss in the loss you backward.
        loss_scale: the AMP GradScaler scale in force for this backward (divided out).
        """
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).cpu()
        self._active, self._micro = (len(ids), 1.0 / loss_scale), {}
        try:
            yield
        finally:
            self._active = None
        missing = [n for n in self.tracked if n not in self._micro]
        if missing:
            raise CaptureError(
                f"layers {missing} received no gradient in this micro-batch; "
                "run forward and backward inside micro_batch(), or do not track those layers"
            )
        w = torch.as_tensor(weight, dtype=torch.float64).cpu().expand(len(ids)).clone()
        self._rows.append((ids, w, self._micro))
        self._micro = {}

    def collect(self, step: int) -> StepGrads:
        """The step's occurrences (all micro-batches since the last collect); resets the buffer.

        Raises NonFiniteGradientError naming the step, layer and sample when a value is NaN/Inf.
        """
        if not self._rows:
            raise CaptureError(f"step {step}: no micro-batch was recorded")
        rows, self._rows = self._rows, []
        if len(rows) == 1:
            ids, weights, grads = rows[0]
        else:
            ids = torch.cat([r[0] for r in rows])
            weights = torch.cat([r[1] for r in rows])
            grads = {n: torch.cat([r[2][n] for r in rows]) for n in self.tracked}
        total = sum(g.sum() for g in grads.values())
        if not bool(torch.isfinite(total)):  # one cheap check per step; locate the culprit only on failure
            self._raise_non_finite(step, ids, grads)
        return StepGrads(step=step, sample_ids=ids, weights=weights, grads=grads)

    @staticmethod
    def _raise_non_finite(step: int, ids: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        for name, g in grads.items():
            bad = ~torch.isfinite(g).all(dim=1)
            if bad.any():
                first = int(ids[bad.nonzero()[0, 0].cpu()])
                raise NonFiniteGradientError(
                    f"step {step}, layer {name!r}: non-finite (NaN/Inf) gradient for {int(bad.sum())} "
                    f"sample(s), first sample_id {first}"
                )
        raise NonFiniteGradientError(f"step {step}: the gradients overflow when summed")

    def discard(self) -> torch.Tensor:
        """Drop what was recorded since the last collect (e.g. an AMP step the scaler skipped).

        Returns the sample ids of the dropped rows ([n] int64), so the step can still be recorded.
        """
        ids = torch.cat([r[0] for r in self._rows]) if self._rows else torch.empty(0, dtype=torch.int64)
        self._rows, self._micro = [], {}
        return ids

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
