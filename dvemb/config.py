"""Run configuration: pydantic models shared by YAML files, the CLI (--set a.b=c) and Prefect UI forms."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from dvemb.errors import DvembError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    source: Literal["digits", "mnist5k", "mnist", "shakespeare", "parquet", "hf"] = "digits"
    train_path: str | None = Field(
        None, description="user Parquet (source=parquet); a saved HF dataset dir or Parquet files/dir (source=hf)"
    )
    val_path: str | None = None
    test_path: str | None = None
    subset: int | None = Field(None, ge=1, description="keep this many training rows (seeded)")
    eval_subset: int | None = Field(None, ge=1, description="keep this many val/test rows (seeded)")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    block_size: int = Field(64, ge=2, description="tokens per text block (shakespeare)")
    n_classes: int | None = Field(
        None,
        ge=2,
        description="classes of a feature table / vocabulary of a token table; null = the source's own "
        "(digits, mnist: 10; shakespeare: GPT-2's 50257) or the task's",
    )
    batch_size: int = Field(32, ge=1)
    label_noise: float = Field(0.0, ge=0, lt=1, description="fraction of training labels flipped on purpose")
    label_noise_kind: Literal["uniform", "pairflip"] = Field(
        "uniform", description="uniform: to a random other class; pairflip: class c to c + 1 (mod C)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.source in ("parquet", "hf") and not self.train_path:
            raise ValueError(f"source {self.source!r} needs train_path")
        return self


class ModelConfig(Section):
    """Options of the built-in tasks (mlp: hidden, activation; gpt: n_layer, n_head, n_embd); seed: model init."""

    hidden: list[int] = Field(default_factory=lambda: [32])
    activation: Literal["tanh", "relu", "gelu"] = "tanh"
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(2, ge=1)
    n_embd: int = Field(64, ge=8)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _no_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" in data:
            raise ValueError(
                f"model.kind was removed: name the task at the top level instead, task: {data['kind']!r} "
                "(built-in mlp | gpt, or 'package.module:Name')"
            )
        return data


class TrainConfig(Section):
    epochs: int = Field(3, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    no_decay: list[str] = Field(
        default_factory=list,
        description="glob patterns over parameter names trained without weight decay (e.g. '*.bias', '*ln_*'); "
        "with any (or the task's own), the optimizer has two param groups: decay (group 0), no_decay",
    )
    group_lr: dict[Literal["decay", "no_decay"], PositiveFloat] = Field(
        default_factory=dict, description="LR multiplier of a param group by name (decay, no_decay); default 1"
    )
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float | None = Field(
        None, gt=0, description="clip the global gradient norm; the clip factor is folded into the recorded LR"
    )
    precision: Literal["64-true", "32-true", "16-mixed", "bf16-mixed"] = "32-true"
    reduction: Literal["mean", "sum"] = "mean"
    devices: int = Field(
        1,
        ge=1,
        description="training processes (GPUs, or CPU processes with accelerator=cpu); > 1 needs strategy=ddp; "
        "data.batch_size is per process: a step's global batch is data.batch_size x devices",
    )
    strategy: Literal["auto", "ddp"] = Field(
        "auto", description="ddp: Lightning DDP over `devices` processes (gloo on CPU, NCCL on GPUs)"
    )
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="Lightning accelerator of the training")

    @model_validator(mode="after")
    def _ranks(self) -> TrainConfig:
        if self.devices > 1 and self.strategy != "ddp":
            raise ValueError(f"train.devices={self.devices} needs train.strategy=ddp")
        return self

    @property
    def world_size(self) -> int:
        """Training processes (ranks): ``devices`` under DDP, else 1."""
        return self.devices if self.strategy == "ddp" else 1


class CaptureConfig(Section):
    k_a: int | None = Field(32, ge=1, description="input-side projection size; null = exact")
    k_s: int | None = Field(32, ge=1, description="output-gradient-side projection size; null = exact")
    kind: Literal["kronecker", "elementwise", "subsample", "rowwise"] = Field(
        "kronecker",
        description="kronecker: k_s x k_a Gaussian projection; elementwise: a k_a * k_s tensor sketch; subsample: "
        "k_s rows x k_a columns of the gradient's own coordinates; rowwise: k_s rows, each with its own k_a "
        "columns (both keep AdamW's elementwise state exact; rowwise is the default of AdamW runs)",
    )
    seed: int = 0
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32",
        description="dtype of the stored projected gradients; float16 / bfloat16 halve the store (computed in "
        "float32, rounded when written, read back as float32)",
    )
    layers: str | list[str] | None = Field(None, description="glob pattern or names; null = every nn.Linear")


class EmbedConfig(Section):
    segments: int = Field(4, ge=1, description="influence checkpoints; segments run in parallel")
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    curvature: Literal["empirical", "fisher", "fisher_mc", "hessian"] = Field(
        "empirical",
        description="H_t: empirical Fisher (nothing extra captured), true Fisher/GGN (C vectors per sample, "
        "captured while training), its Monte-Carlo estimate (fisher_samples labels per sample), or the exact "
        "Hessian in the store's coordinates (Hessian-vector products at the replayed parameters; nothing captured, "
        "the run must be replayable)",
    )
    fisher_samples: int = Field(1, ge=1, description="sampled labels per sample for curvature=fisher_mc")
    blocks: Literal["layer", "model"] = Field(
        "layer", description="curvature blocks: one per layer (block-diagonal) or one over all tracked layers"
    )
    write: Literal["auto", "always", "never"] = Field(
        "auto",
        description="write the embeddings and propagators: auto = only when score.mode=embedding scores with "
        "them (exact and direct modes need none; the embed stage then writes nothing), always, or never",
    )


class ScoreConfig(Section):
    mode: Literal["embedding", "direct", "exact"] = Field(
        "exact",
        description="exact: one reverse sweep through the recorded optimizer (exact curvature, one objective; "
        "no gradient store needed); embedding / direct: the data value embeddings (approximate curvature, "
        "any number of queries)",
    )
    checkpoints: bool = Field(True, description="also score at every intermediate segment boundary")
    replay_dtype: Literal["recorded", "float64"] = Field(
        "recorded", description="exact mode: replay in the dtype the run was trained in, or in float64"
    )
    removal: Literal["auto", "linear", "step"] = Field(
        "auto",
        description="exact mode: remove an occurrence to first order (linear), or take its removal step exactly "
        "and the rest to first order (step: per-sample gradients of each batch); auto = step for AdamW or clipping",
    )


class CurateConfig(Section):
    drop: Literal["negative", "quantile", "none"] = "negative"
    quantile: float = Field(0.1, ge=0, lt=1, description="lowest fraction dropped when drop=quantile")
    filter_by: str = Field("value", description="value column of scores/samples.parquet the filter ranks by")
    phases: list[int] | None = Field(
        None, min_length=2, max_length=2, description="[early_end, late_start] steps; null = detect from the run"
    )
    phase_threshold: float = Field(0.5, gt=0, lt=1, description="basin level, fraction of the log influence range")
    phase_smooth: int | None = Field(None, ge=1, description="smoothing window (steps); null = about T/20")
    phase_curve: Literal["per_lr", "raw"] = Field(
        "per_lr", description="influence curve for phase detection: mean |score| per step divided by its LR, or raw"
    )
    reorder: Literal["none", "early"] = Field("none", description="early: most valuable first in the early phase")
    select: Literal["none", "prior", "online"] = Field(
        "none", description="online batch selection: by prior value, or by online gradient alignment"
    )
    select_phases: list[Literal["early", "middle", "late"]] = Field(
        default_factory=lambda: ["early", "late"], description="phases in which selection is active"
    )
    select_budget: float | None = Field(
        None, gt=0, le=1, description="at most this fraction of the steps select (phases shrink toward their ends)"
    )
    pool_factor: int = Field(4, ge=1, description="candidate pool = pool_factor x batch size")
    select_stratify: bool = Field(
        False, description="classification: the selected batch keeps each label's share of the pool"
    )
    select_value: str = Field("value", description="prior value column used by select=prior and reorder")
    val_every: int = Field(1, ge=1, description="online: refresh the validation gradient every n selection steps")
    val_samples: int = Field(512, ge=1, description="online: validation rows in the validation gradient")


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    task: str = Field(
        "mlp", description="what is trained: a built-in task (mlp, gpt) or a user task 'package.module:Name'"
    )
    task_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the task class")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)

    @model_validator(mode="after")
    def _embeddings_for_embedding_mode(self) -> RunConfig:
        if self.embed.write == "never" and self.score.mode == "embedding":
            raise ValueError("embed.write=never, but score.mode=embedding scores with the embeddings")
        return self

    @model_validator(mode="after")
    def _adamw_capture(self) -> RunConfig:
        """AdamW runs capture a per-row coordinate subset by default: the Adam-aware embedding modes need AdamW's
        elementwise state in the stored coordinates, and per-row column sets rank best of the stores measured
        (docs/RESULTS.md, bench_adam_projection)."""
        if self.train.optimizer == "adamw" and "kind" not in self.capture.model_fields_set:
            self.capture.kind = "rowwise"
        return self


def writes_embeddings(write: str, score_mode: str) -> bool:
    """Whether the embed stage writes embeddings and propagators (``embed.write``, ``score.mode``)."""
    return write == "always" or (write == "auto" and score_mode == "embedding")


class ConfigError(DvembError):
    """A config file or override breaks a rule; the message names the field."""


def _explain(err: ValidationError, where: str) -> ConfigError:
    lines = [f"{where}: invalid config"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError("\n".join(lines))


def _yaml_error(err: yaml.YAMLError, where: str) -> ConfigError:
    """A YAML syntax error or a refused tag (``!!python/...``) as one line naming the place."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("tag", 1)[1].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        return ConfigError(f"{where}{at}: YAML tag {tag} refused — configs are plain YAML (no Python objects)")
    return ConfigError(f"{where}{at}: not valid YAML ({problem})")


def _check_name(name: str, where: str) -> None:
    """``name`` becomes the folder ``runs/<name>``: a plain folder name, never a path."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("~"):
        raise ConfigError(
            f"{where}: name {name!r} must be a plain folder name (no '/', '..' or '~'); it names runs/<name>"
        )


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r}: {key.strip()!r} is not a key path like section.field")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise _yaml_error(e, f"override {item!r}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config (or ``base``, or the defaults), apply ``--set`` overrides, validate.

    Every failure is a ConfigError naming the file (line and column for YAML errors) or the field."""
    raw: dict = copy.deepcopy(base) if base else {}
    where = "recorded config" if base else "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        except yaml.YAMLError as e:
            raise _yaml_error(e, str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    where += f" with overrides {list(overrides)}" if overrides else ""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, where) from None
    _check_name(cfg.name, where)
    return cfg
