"""Records shared by the stages, in one leaf module so that imports point one way
(capture -> store -> embed -> score -> curate; data knows no model).

* :class:`ProjectionConfig` — how per-sample gradients are compressed (sizes, seed, dtype, kind).
* :class:`StepGrads` — the per-sample gradient contributions of one optimizer step.
* :class:`Schedule` — per-step learning rate and weight decay as applied (optionally per param group).
* :class:`LayerProjection` — how one layer's gradient is stored (dims, projection sizes, seed, kind).
* :class:`OptimizerSpec`, :class:`StepHyper` — the optimizer as trained (recorded by capture, replayed by
  dvemb.replay).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from dvemb.errors import ReplayError


@dataclass(frozen=True)
class ProjectionConfig:
    """Projection sizes per layer side; ``k >= d`` (or None) means exact (identity).

    kind: ``kronecker`` (k_s x k_a matrix), ``elementwise`` (a k_a * k_s tensor sketch; both k needed),
    ``subsample`` or ``rowwise`` (coordinates of G; see :class:`LayerProjection`).
    """

    k_a: int | None = 32
    k_s: int | None = 32
    seed: int = 0
    dtype: str = "float32"
    kind: str = "kronecker"

    @classmethod
    def of(cls, capture) -> ProjectionConfig:
        """From a run config's ``capture`` section (dvemb.config.CaptureConfig)."""
        return cls(capture.k_a, capture.k_s, capture.seed, capture.dtype, capture.kind)


@dataclass
class StepGrads:
    """The per-sample gradient contributions of one optimizer step (rows = occurrences)."""

    step: int
    sample_ids: torch.Tensor  # [B] int64
    weights: torch.Tensor  # [B] float64, coefficient of each sample's loss in L_t
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [B, D_layer]


Rate = float | torch.Tensor  # one value for a whole layer, or one per stored coordinate ([D] float64)
Vectors = dict[str, torch.Tensor]  # layer (or block) -> [n, D]
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


def clipped_norms(clip: Sequence[float], max_norm: float | None) -> list[float]:
    """Per step: the total gradient norm ``max_norm / c - eps`` where global-norm clipping scaled the step by its
    recorded factor c < 1, else 0."""
    if max_norm is None:
        return [0.0] * len(clip)
    return [max_norm / c - CLIP_EPS if 0 < c < 1 else 0.0 for c in clip]


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate actually applied and coupled weight decay, indexed by step.

    A parameter's step is ``theta' = (1 - lr * wd) theta - lr * g`` (the clip factor folded into ``lr``).
    ``lr`` / ``weight_decay``: one value per step (the first param group's). Optional per-group extension
    (e.g. nanoGPT's decay / no-decay groups with their own LR): ``group_lr[t][i]`` /
    ``group_weight_decay[t][i]`` in the same convention for param group i, and ``layer_groups``: layer ->
    the group of its stored coordinates, an int (the whole layer) or a [D] int64 tensor (one group per
    stored coordinate, e.g. a weight that decays and a bias that does not). A layer without an entry
    follows ``lr`` / ``weight_decay``. ``clip_norm``: per step, the total gradient norm where global-norm clipping
    scaled the step (0 elsewhere; None: no clipping recorded), for clipping's derivative (dvemb.embed.clipping).
    """

    lr: Sequence[float]
    weight_decay: Sequence[float]
    group_lr: Sequence[Sequence[float]] | None = None
    group_weight_decay: Sequence[Sequence[float]] | None = None
    layer_groups: Mapping[str, int | torch.Tensor] = field(default_factory=dict)
    clip_norm: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if (self.group_lr is None) != (self.group_weight_decay is None):
            raise ValueError("Schedule: group_lr and group_weight_decay come together")
        if self.group_lr is not None and not len(self.group_lr) == len(self.group_weight_decay) == len(self.lr):
            raise ValueError(
                f"Schedule: {len(self.lr)} steps but group_lr / group_weight_decay cover "
                f"{len(self.group_lr)} / {len(self.group_weight_decay)}"
            )
        if self.layer_groups and self.group_lr is None:
            raise ValueError("Schedule: layer_groups needs group_lr and group_weight_decay")

    def clipped_norm(self, step: int) -> float:
        """||g_t|| of a clipped step, else 0."""
        return float(self.clip_norm[step]) if self.clip_norm is not None else 0.0

    @property
    def per_layer(self) -> bool:
        """True when some layer follows its own param groups."""
        return self.group_lr is not None and bool(self.layer_groups)

    def at(self, step: int) -> tuple[float, float]:
        if not 0 <= step < len(self.lr):
            raise IndexError(f"step {step}: the schedule covers steps 0..{len(self.lr) - 1}")
        return float(self.lr[step]), float(self.weight_decay[step])

    def layer_at(self, step: int, layer: str) -> tuple[Rate, Rate]:
        """(lr, weight decay) of ``layer``'s own parameters at ``step``: floats, or [D] float64 per coordinate."""
        lr, wd = self.at(step)
        group = self.layer_groups.get(layer)
        if group is None or self.group_lr is None:
            return lr, wd
        glr, gwd = self.group_lr[step], self.group_weight_decay[step]
        if isinstance(group, int):
            return float(glr[group]), float(gwd[group])
        idx = group.to(torch.int64)
        return torch.tensor(glr, dtype=torch.float64)[idx], torch.tensor(gwd, dtype=torch.float64)[idx]

    def rates(self, step: int, layers: Iterable[str]) -> tuple[Rate | dict[str, Rate], Rate | dict[str, Rate]]:
        """(lr, weight decay) at ``step`` for the recursion: two floats without per-layer groups, else two
        mappings layer -> :meth:`layer_at`."""
        if not self.per_layer:
            return self.at(step)
        both = {n: self.layer_at(step, n) for n in layers}
        return {n: v[0] for n, v in both.items()}, {n: v[1] for n, v in both.items()}


# --- projections ---------------------------------------------------------------------------
KINDS = ("kronecker", "elementwise", "subsample", "rowwise")


@dataclass(frozen=True)
class LayerProjection:
    """How one layer's [d_out, d_in] gradient is compressed.

    d_in counts the bias column when ``bias``; ``layer`` is the layer kind (dvemb.capture.layers);
    ``params`` names the model parameters whose gradient this is (as in ``model.named_parameters()``).

    kind: ``kronecker`` (P_s G P_a^T, Gaussian), ``elementwise`` (a k_a * k_s tensor sketch),
    ``subsample`` (G at k_s rows x k_a columns, one column set shared by every row: :func:`selection`)
    or ``rowwise`` (G at k_s rows, each kept row with its own k_a columns: rows = :func:`selection`
    with ``seed + 1`` as for subsample, columns = :func:`row_columns` with ``seed``; flattened
    row-major, coordinate (i, j) = G[row_i, cols[i, j]]). For subsample and rowwise a side with
    k >= d keeps all of it (rowwise with k_a >= d_in is subsample with an exact a side).
    """

    d_in: int
    d_out: int
    k_a: int
    k_s: int
    seed: int
    kind: str = "kronecker"
    layer: str = "linear"
    bias: bool = True
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projection kind {self.kind!r}: choose one of {', '.join(KINDS)}")

    @property
    def identity_a(self) -> bool:
        return self.kind != "elementwise" and self.k_a >= self.d_in

    @property
    def identity_s(self) -> bool:
        return self.kind != "elementwise" and self.k_s >= self.d_out

    @property
    def own_coordinates(self) -> bool:
        """Every stored value is one coordinate of G (unprojected, subsample or rowwise): elementwise optimizer
        state (AdamW's moments) keeps its meaning in the stored space."""
        return self.kind in ("subsample", "rowwise") or (self.identity_a and self.identity_s)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the stored per-sample gradient matrix (elementwise: one row of k_a * k_s)."""
        if self.kind == "elementwise":
            return (1, self.k_a * self.k_s)
        return (
            self.d_out if self.identity_s else self.k_s,
            self.d_in if self.identity_a else self.k_a,
        )

    @property
    def dim(self) -> int:
        """Length of the flattened per-sample gradient."""
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict:
        return asdict(self) | {
            "params": list(self.params),
            "identity_a": self.identity_a,
            "identity_s": self.identity_s,
            "dim": self.dim,
        }

    @classmethod
    def from_json(cls, d: dict) -> LayerProjection:
        # files written before the elementwise kind / the layer registry: kronecker, a Linear with bias
        return cls(
            d_in=d["d_in"],
            d_out=d["d_out"],
            k_a=d["k_a"],
            k_s=d["k_s"],
            seed=d["seed"],
            kind=d.get("kind", "kronecker"),
            layer=d.get("layer", "linear"),
            bias=d.get("bias", True),
            params=tuple(d.get("params", ())),
        )


def selection(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] float64 0/1 matrix picking ``rows`` distinct coordinates (ascending), seeded.

    The ``subsample`` kind: the stored gradient is G at a fixed random subset of its coordinates, so an
    elementwise optimizer state (AdamW's second moment) stays elementwise in the stored space.
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(cols, generator=gen)[:rows].sort().values
    p = torch.zeros(rows, cols, dtype=torch.float64)
    p[torch.arange(rows), idx] = 1.0
    return p


def row_columns(rows: int, k: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, min(k, cols)] int64: for each kept row i (in order) its own ``k`` distinct columns of G
    (ascending), one ``randperm(cols)`` per row from one generator seeded with ``seed``; k >= cols: all.

    The ``rowwise`` kind: the stored coordinate (i, j) is G[row_i, table[i, j]], flattened row-major.
    """
    if k >= cols:
        return torch.arange(cols).expand(rows, cols).clone()
    gen = torch.Generator().manual_seed(seed)
    table = torch.empty(rows, k, dtype=torch.int64)
    for i in range(rows):
        table[i] = torch.randperm(cols, generator=gen)[:k].sort().values
    return table


def draw(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """The projection matrix of a kind: Gaussian (kronecker, elementwise) or a coordinate selection
    (subsample; rowwise's row side — its columns are :func:`row_columns`, not a matrix)."""
    return selection(rows, cols, seed) if kind in ("subsample", "rowwise") else gaussian(rows, cols, seed)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] float64 matrix with N(0, 1/rows) entries, identical on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / rows**0.5


# --- the optimizer as trained ----------------------------------------------------------------
SEP = "::"  # optimizer state keys: "{parameter name}::{state key}"


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything about the optimizer that the replay needs besides the per-step LR and decay.

    groups: parameter names of each param group (group order as in the optimizer).
    """

    kind: str
    groups: tuple[tuple[str, ...], ...]
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    maximize: bool = False
    grad_clip: float | None = None
    group_of: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_of", {n: i for i, names in enumerate(self.groups) for n in names})

    @classmethod
    def from_torch(
        cls, optimizer: torch.optim.Optimizer, names: Mapping[int, str], grad_clip: float | None = None
    ) -> OptimizerSpec:
        """Read a torch optimizer. names: ``id(parameter) -> name`` (every optimized parameter must have one)."""
        if isinstance(optimizer, torch.optim.AdamW):
            kind = "adamw"
        elif isinstance(optimizer, torch.optim.SGD):
            kind = "sgd"
        else:
            kind = type(optimizer).__name__
        groups = []
        for i, g in enumerate(optimizer.param_groups):
            missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
            if missing:
                raise ReplayError(f"optimizer param group {i}: parameters of shapes {missing[:3]} are not in the model")
            groups.append(tuple(names[id(p)] for p in g["params"]))
        g0 = optimizer.param_groups[0]
        return cls(
            kind=kind,
            groups=tuple(groups),
            momentum=float(g0.get("momentum", 0.0) or 0.0),
            dampening=float(g0.get("dampening", 0.0) or 0.0),
            nesterov=bool(g0.get("nesterov", False)),
            betas=tuple(float(b) for b in g0.get("betas", (0.9, 0.999))),
            eps=float(g0.get("eps", 1e-8)),
            amsgrad=bool(g0.get("amsgrad", False)),
            maximize=bool(g0.get("maximize", False)),
            grad_clip=grad_clip,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("group_of")
        d["groups"] = [{"params": list(names)} for names in self.groups]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> OptimizerSpec:
        d = dict(d)
        d["groups"] = tuple(tuple(g["params"]) for g in d["groups"])
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        d.pop("group_weight_decay", None)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "group_of"})

    def check_replayable(self) -> None:
        """ReplayError naming the option that the step map does not reproduce."""
        if self.kind not in ("sgd", "adamw"):
            raise ReplayError(
                f"optimizer {self.kind!r}: only torch.optim.SGD and torch.optim.AdamW have an exact step map"
            )
        if self.amsgrad:
            raise ReplayError(
                "optimizer AdamW(amsgrad=True): AMSGrad's running max is not replayable; use amsgrad=False"
            )
        if self.maximize:
            raise ReplayError("optimizer maximize=True is not supported by the replay")
        if self.kind == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ReplayError("SGD nesterov=True needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    def state_keys(self) -> tuple[str, ...]:
        if self.kind == "adamw":
            return ("exp_avg", "exp_avg_sq", "step")
        return ("momentum_buffer",) if self.momentum else ()


@dataclass(frozen=True)
class StepHyper:
    """Per-group learning rate and weight decay of one step, as the optimizer held them when it stepped."""

    lr: tuple[float, ...]
    weight_decay: tuple[float, ...]


def torch_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> dict[str, torch.Tensor]:
    """The flat state dict of a torch optimizer (``"{name}::{key}"``); tensors detached, not copied."""
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if v is None:
                    continue
                out[f"{names[id(p)]}{SEP}{key}"] = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
    return out
