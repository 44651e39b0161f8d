"""Layer hooks that record per-sample projected gradients without per-sample backward passes.

For every tracked ``nn.Linear`` a forward hook keeps the layer input ``a`` and attaches a
tensor hook to the output; when autograd delivers ``ds = dL/d(output)`` the hook forms
``sum_tokens (P_s ds)(P_a a)^T`` per sample. ``L`` is whatever loss you call ``backward`` on,
so the recorded vector is the per-sample *contribution* ``g_z = w_z grad l_z`` (DESIGN §2),
with the AMP loss scale divided out. You tell the capture ``w_z`` (see :func:`loss_weight`).

Usage (one optimizer step, two accumulation micro-batches, mean reduction)::

    cap = GradientCapture(model, ProjectionConfig(k_a=32, k_s=32))
    for ids, x, y in micro_batches:
        with cap.micro_batch(ids, weight=loss_weight("mean", len(ids), accumulation=2)):
            (loss_fn(model(x), y) / 2).backward()
    record = cap.collect(step=t)   # StepGrads: sample_ids [B], weights [B], grads {layer: [B, D]}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dvemb.capture.projection import DTYPES, LayerProjection, Projector, layer_seed
from dvemb.errors import CaptureError, NonFiniteGradientError
from dvemb.types import ProjectionConfig, StepGrads


def loss_weight(reduction: str, batch_size: int, accumulation: int = 1, loss_scale: float = 1.0) -> float:
    """w_z for a micro-batch: 1/(B * accumulation) for "mean", 1/accumulation for "sum".

    ``loss_scale`` is any extra factor you multiply the loss by yourself (not AMP's scaler).
    """
    if reduction == "mean":
        return loss_scale / (batch_size * accumulation)
    if reduction == "sum":
        return loss_scale / accumulation
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def select_linear_layers(model: nn.Module, layers: Sequence[str] | str | None = None) -> dict[str, nn.Linear]:
    """Tracked layers by name: None = every nn.Linear; a string = glob pattern; a list = exact names.

    Raises CaptureError naming a requested module that does not exist or is not an nn.Linear.
    """
    modules = dict(model.named_modules())
    if layers is None or isinstance(layers, str):
        pattern = layers or "*"
        found = {n: m for n, m in modules.items() if isinstance(m, nn.Linear) and fnmatch.fnmatch(n, pattern)}
        if not found:
            raise CaptureError(f"no nn.Linear layer matches the pattern {pattern!r}")
        return found
    out = {}
    for name in layers:
        if name not in modules:
            raise CaptureError(f"layer {name!r}: no such module in the model")
        if not isinstance(modules[name], nn.Linear):
            kind = type(modules[name]).__name__
            raise CaptureError(f"layer {name!r} is a {kind}; only nn.Linear layers can be tracked")
        out[name] = modules[name]
    return out


def layer_projections(tracked: dict[str, nn.Linear], cfg: ProjectionConfig) -> dict[str, LayerProjection]:
    """The recorded projection of every tracked layer (d_in includes the bias input)."""
    if cfg.kind == "elementwise" and (cfg.k_a is None or cfg.k_s is None):
        raise ValueError("capture.kind 'elementwise' needs k_a and k_s (the sketch has k_a * k_s dimensions)")
    elementwise = cfg.kind == "elementwise"  # the sketch keeps k_a * k_s dims even where k >= d
    specs = {}
    for name, lin in tracked.items():
        d_in, d_out = lin.in_features + 1, lin.out_features
        specs[name] = LayerProjection(
            d_in=d_in,
            d_out=d_out,
            k_a=cfg.k_a if elementwise else min(cfg.k_a or d_in, d_in),
            k_s=cfg.k_s if elementwise else min(cfg.k_s or d_out, d_out),
            seed=layer_seed(cfg.seed, name),
            kind=cfg.kind,
        )
    return specs


class GradientCapture:
    """Records per-sample projected gradients of the tracked Linear layers of ``model``."""

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
        self.tracked = select_linear_layers(model, layers)
        self.specs = layer_projections(self.tracked, projection)
        dev = device or next(model.parameters()).device
        self.projectors = {n: Projector(s, self.dtype, dev) for n, s in self.specs.items()}
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.tracked.items()]
        self._active: tuple[int, float] | None = None  # (batch size, 1 / loss scale) while recording
        self._micro: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._active is None or not output.requires_grad:
                return
            a = inputs[0].detach()
            batch, inv_scale = self._active
            if a.shape[0] != batch:
                raise CaptureError(
                    f"layer {name!r}: input batch dimension {a.shape[0]} != {batch} sample ids; "
                    "tracked layers must see inputs as [B, d] or [B, S, d]"
                )

            def on_grad(ds: torch.Tensor) -> None:
                g = self.projectors[name].per_sample(a, ds)
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
