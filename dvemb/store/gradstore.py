"""Arrow IPC store of per-occurrence vectors (gradients or embeddings), one file per segment/rank.

File layout (uncompressed IPC *file* format, memory-mappable): columns ``step`` (int64),
``sample_id`` (int64), ``weight`` (float64, w_z), and one ``FixedSizeList<float32|float64>``
per layer, rows grouped by ascending step. Schema metadata carries the schema version, the
kind ("grads" / "embeddings"), the layer dims and the dtype. ``projection.json`` beside the
files records every layer's projection. Reads are zero-copy views of the mapped file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dvemb.capture.projection import LayerProjection
from dvemb.errors import ProjectionMismatchError, StoreError
from dvemb.store.atomic import temp_path_for, write_json
from dvemb.types import ProjectionConfig, StepGrads

SCHEMA_VERSION = 1
ARROW_TYPES = {"float32": pa.float32(), "float64": pa.float64()}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def segment_schema(layer_dims: dict[str, int], dtype: str, kind: str) -> pa.Schema:
    fields = [
        pa.field("step", pa.int64()),
        pa.field("sample_id", pa.int64()),
        pa.field("weight", pa.float64()),
    ]
    fields += [pa.field(n, pa.list_(ARROW_TYPES[dtype], d)) for n, d in layer_dims.items()]
    meta = {
        "dvemb_schema_version": str(SCHEMA_VERSION),
        "kind": kind,
        "dtype": dtype,
        "layers": json.dumps(layer_dims),
    }
    return pa.schema(fields, metadata=meta)


class SegmentWriter:
    """Streams steps into ``path`` (a hidden temp file until :meth:`close` renames it).

    Use as a context manager; if the block raises, nothing appears under ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layer_dims: dict[str, int],
        dtype: str = "float32",
        kind: str = "grads",
    ):
        self.path = Path(path)
        self.layer_dims = dict(layer_dims)
        self.dtype = dtype
        self.schema = segment_schema(self.layer_dims, dtype, kind)
        self._tmp = temp_path_for(self.path)
        self._writer = pa.ipc.new_file(str(self._tmp), self.schema)
        self._last_step: int | None = None

    def write(
        self,
        step: int,
        sample_ids: torch.Tensor,
        weights: torch.Tensor,
        layers: dict[str, torch.Tensor],
    ) -> None:
        """Append the rows of one step. layers: name -> [B, D] (cast to the store dtype)."""
        if self._last_step is not None and step <= self._last_step:
            raise StoreError(f"{self.path.name}: step {step} written after step {self._last_step}; steps must ascend")
        if set(layers) != set(self.layer_dims):
            raise StoreError(
                f"{self.path.name}: step {step} has layers {sorted(layers)}, expected {sorted(self.layer_dims)}"
            )
        n = len(sample_ids)
        np_dtype = np.float32 if self.dtype == "float32" else np.float64
        cols = [
            pa.array(np.full(n, step, dtype=np.int64)),
            pa.array(sample_ids.cpu().numpy().astype(np.int64)),
            pa.array(weights.cpu().numpy().astype(np.float64)),
        ]
        for name, d in self.layer_dims.items():
            g = layers[name].detach().cpu().numpy().astype(np_dtype, copy=False)
            if g.shape != (n, d):
                raise StoreError(f"{self.path.name}: step {step}, layer {name!r}: shape {g.shape}, expected {(n, d)}")
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(g.reshape(-1)), d))
        self._writer.write_batch(pa.record_batch(cols, schema=self.schema))
        self._last_step = step

    def write_step(self, record: StepGrads) -> None:
        self.write(record.step, record.sample_ids, record.weights, record.grads)

    def write_steps(self, records: list[StepGrads]) -> None:
        for r in records:
            self.write_step(r)

    def close(self) -> None:
        """Finish the file and move it into place."""
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file; nothing appears under the final name."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _view(arr: pa.Array, path: Path, name: str) -> torch.Tensor:
    """A zero-copy tensor over a column chunk without nulls (mapped memory: read-only, never written)."""
    if arr.null_count:
        raise StoreError(f"{path}: column {name!r} has {arr.null_count} null(s)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr.to_numpy(zero_copy_only=True))


def read_segment(
    path: str | os.PathLike, expected_steps: range | None = None, kind: str | None = None
) -> list[StepGrads]:
    """Memory-map a store file; each step's rows become zero-copy tensors over the mapping.

    Returns the steps in ascending order (``grads`` holds embeddings for an embeddings file).
    Raises StoreError naming the file when it is missing, truncated, of another schema version,
    or lacks some of ``expected_steps``.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store file")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{path}: truncated or not an Arrow IPC file ({e})") from e
    meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
    version = meta.get("dvemb_schema_version")
    if version != str(SCHEMA_VERSION):
        raise StoreError(f"{path}: store schema version {version!r}, this dvemb reads {SCHEMA_VERSION}")
    if kind is not None and meta.get("kind") != kind:
        raise StoreError(f"{path}: holds {meta.get('kind')!r}, expected {kind!r}")
    layer_dims: dict[str, int] = json.loads(meta["layers"])
    records = []
    for b in batches:
        steps = _view(b.column("step"), path, "step")
        step = int(steps[0])
        if not bool((steps == step).all()):
            raise StoreError(f"{path}: a record batch mixes steps {sorted(set(steps.tolist()))}")
        if records and step <= records[-1].step:
            raise StoreError(f"{path}: step {step} follows step {records[-1].step}; steps must ascend")
        grads = {}
        for name, d in layer_dims.items():
            col = b.column(name)
            if col.null_count:
                raise StoreError(f"{path}: step {step}, layer {name!r} has null rows")
            grads[name] = _view(col.values, path, name).view(-1, d)[col.offset : col.offset + len(col)]
        ids, w = _view(b.column("sample_id"), path, "sample_id"), _view(b.column("weight"), path, "weight")
        records.append(StepGrads(step=step, sample_ids=ids, weights=w, grads=grads))
    if expected_steps is not None:
        present = {r.step for r in records}
        missing = [s for s in expected_steps if s not in present]
        extra = sorted(present - set(expected_steps))
        if missing or extra:
            more = "…" if len(missing) > 10 else ""
            raise StoreError(
                f"{path}: segment should cover steps {expected_steps.start}..{expected_steps.stop - 1}; "
                f"missing steps {missing[:10]}{more}" + (f", unexpected steps {extra[:10]}" if extra else "")
            )
    return records


def write_projection(path: str | os.PathLike, specs: dict[str, LayerProjection], cfg: ProjectionConfig) -> None:
    """Write ``projection.json``: per-layer dims, k_a, k_s, seeds, dtype."""
    write_json(
        path,
        {
            "schema_version": SCHEMA_VERSION,
            "dtype": cfg.dtype,
            "base_seed": cfg.seed,
            "layers": {n: s.to_json() for n, s in specs.items()},
        },
    )


def read_projection(path: str | os.PathLike) -> dict[str, LayerProjection]:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no projection.json")
    d = json.loads(path.read_text())
    return {n: LayerProjection.from_json(s) for n, s in d["layers"].items()}


def check_same_projection(stored: dict[str, LayerProjection], other: dict[str, LayerProjection], where: str) -> None:
    """Raise ProjectionMismatchError naming the layer and field where two projections differ."""
    if set(stored) != set(other):
        raise ProjectionMismatchError(
            f"{where}: layers differ from the store: only in store {sorted(set(stored) - set(other))}, "
            f"only here {sorted(set(other) - set(stored))}"
        )
    for name, s in stored.items():
        for f in ("kind", "d_in", "d_out", "k_a", "k_s", "seed"):
            if getattr(s, f) != getattr(other[name], f):
                raise ProjectionMismatchError(
                    f"{where}: layer {name!r} has {f}={getattr(other[name], f)}, the store has {getattr(s, f)}"
                )
