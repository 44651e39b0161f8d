"""Arrow IPC store of per-occurrence vectors (gradients or embeddings), one file per segment/rank.

File layout (uncompressed IPC *file* format, memory-mappable): columns ``step`` (int64),
``sample_id`` (int64), ``weight`` (float64, w_z), and one ``FixedSizeList<float32|float64>``
per layer, rows grouped by ascending step. Schema metadata carries the schema version, the
kind ("grads" / "embeddings"), the layer dims and the dtype. ``projection.json`` beside the
files records every layer's projection. Reads are zero-copy views of the mapped file.

Half-precision stores (``capture.dtype`` float16 / bfloat16: half the bytes of float32) keep the
vectors as ``FixedSizeList<halffloat>`` or, since Arrow has no bfloat16, as the bfloat16 bit
patterns in ``FixedSizeList<uint16>`` (metadata ``encoding``: ``bfloat16-bits``); these files carry
schema version 2 so that an older dvemb refuses them instead of misreading them. Reading converts
their vectors to float32 (a copy per step; ids and weights stay zero-copy).

:class:`SegmentedRecords` reads the steps of consecutive segment files one segment at a time, so a
pass over a run holds one segment in memory, not the run.

A segment trained by W > 1 ranks (DDP) is W shards ``seg-XXXX-rank-R.arrow``, each with the rows of its
rank's local batches; their schema metadata names ``rank`` and ``world_size``. :func:`read_segment` of
any shard reads all W and merges them into the global per-step records (in each step, the ranks' rows
in rank order: the order of ``trajectory/batches.parquet``), refusing a missing shard, shards that do not
cover the same steps, and a sample that two ranks both claim in one step.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import queue
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, overload

import numpy as np
import pyarrow as pa
import torch

from dvemb.errors import ProjectionMismatchError, StoreError
from dvemb.store.atomic import finalize, temp_path_for, write_json
from dvemb.types import LayerProjection, ProjectionConfig, StepGrads

SCHEMA_VERSION = 1
HALF_SCHEMA_VERSION = 2  # float16 / bfloat16 vectors (older readers refuse the file)
ARROW_TYPES = {"float32": pa.float32(), "float64": pa.float64(), "float16": pa.float16(), "bfloat16": pa.uint16()}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
HALF_DTYPES = ("float16", "bfloat16")


def segment_schema(layer_dims: dict[str, int], dtype: str, kind: str, rank: int = 0, world_size: int = 1) -> pa.Schema:
    fields = [
        pa.field("step", pa.int64()),
        pa.field("sample_id", pa.int64()),
        pa.field("weight", pa.float64()),
    ]
    fields += [pa.field(n, pa.list_(ARROW_TYPES[dtype], d)) for n, d in layer_dims.items()]
    meta = {
        "dvemb_schema_version": str(HALF_SCHEMA_VERSION if dtype in HALF_DTYPES else SCHEMA_VERSION),
        "kind": kind,
        "dtype": dtype,
        "layers": json.dumps(layer_dims),
    }
    if dtype == "bfloat16":
        meta["encoding"] = "bfloat16-bits"  # uint16 values are the bit patterns of bfloat16 numbers
    if world_size > 1:  # one rank's shard of a DDP segment (a one-process file says nothing)
        meta["rank"], meta["world_size"] = str(rank), str(world_size)
    return pa.schema(fields, metadata=meta)


def _store_values(g: torch.Tensor) -> np.ndarray:
    """The flat numpy values Arrow stores for a host tensor of the store dtype (bfloat16: its bits)."""
    if g.dtype == torch.bfloat16:
        g = g.view(torch.uint16)
    return g.numpy().reshape(-1)


def _vectors(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored vector values as the tensor handed to readers: float32/64 as they are (zero-copy),
    float16 / bfloat16 converted to float32 (a copy)."""
    if dtype == "bfloat16":
        return values.view(torch.bfloat16).to(torch.float32)
    if dtype == "float16":
        return values.to(torch.float32)
    return values


@dataclass
class _HostRows:
    """One step's rows in host memory, as handed to the writer (layers in the schema's order)."""

    step: int
    sample_ids: torch.Tensor  # [B] int64, CPU
    weights: torch.Tensor  # [B] float64, CPU
    layers: list[torch.Tensor]  # [B, D] in the store dtype, CPU (pinned when copied from CUDA)
    ready: list[torch.cuda.Event]  # recorded after the device-to-host copies; empty = ready now


def _open_os_file(path: Path) -> pa.NativeFile:
    return pa.OSFile(str(path), "wb")


class SegmentWriter:
    """Streams steps into ``path`` (a hidden temp file until :meth:`close` renames it).

    Use as a context manager; if the block raises, nothing appears under ``path``.

    asynchronous: None = on for the kinds written while training (``grads``, ``curvature``). Then
    :meth:`write` validates the rows, copies them to host memory (from CUDA: into pinned memory,
    ``non_blocking``) and returns; one background thread writes the steps in order. At most
    ``queue_steps`` steps wait in memory; a write beyond that blocks until the thread catches up.
    An error in the thread is raised (as :class:`StoreError`, naming the file and step) by the next
    :meth:`write` or by :meth:`close`, and the temp file is removed. The file's bytes are the same
    either way. opener: opens the temp file for writing (default ``pa.OSFile``), e.g. a throttled
    file in a benchmark. rank / world_size: the DDP rank whose shard this is (recorded when world_size > 1).
    """

    ASYNC_KINDS = ("grads", "curvature")

    def __init__(
        self,
        path: str | os.PathLike,
        layer_dims: dict[str, int],
        dtype: str = "float32",
        kind: str = "grads",
        *,
        asynchronous: bool | None = None,
        queue_steps: int = 16,
        opener: Callable[[Path], pa.NativeFile | BinaryIO] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if queue_steps < 1:
            raise ValueError(f"queue_steps must be >= 1, got {queue_steps}")
        self.path = Path(path)
        self.layer_dims = dict(layer_dims)
        if dtype not in TORCH_DTYPES:
            raise StoreError(f"{Path(path).name}: store dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
        self.dtype = dtype
        self._torch_dtype = TORCH_DTYPES[dtype]
        self.schema = segment_schema(self.layer_dims, dtype, kind, rank, world_size)
        self.asynchronous = kind in self.ASYNC_KINDS if asynchronous is None else asynchronous
        self._tmp = temp_path_for(self.path)
        self._sink = None
        try:
            self._sink = (opener or _open_os_file)(self._tmp)
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        except BaseException:
            if self._sink is not None:
                self._sink.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._last_step: int | None = None
        self._done = False  # closed, aborted or discarded: no more writes
        self._failure: tuple[int, BaseException] | None = None  # (step, error) from the writer thread
        self._aborting = False
        self._queue: queue.Queue[_HostRows | None] | None = None
        self._thread: threading.Thread | None = None
        if self.asynchronous:
            self._queue = queue.Queue(maxsize=queue_steps)
            self._thread = threading.Thread(target=self._drain, name=f"dvemb-store {self.path.name}", daemon=True)
            self._thread.start()

    # --- writing --------------------------------------------------------------------------
    def write(
        self,
        step: int,
        sample_ids: torch.Tensor,
        weights: torch.Tensor,
        layers: dict[str, torch.Tensor],
    ) -> None:
        """Append the rows of one step. layers: name -> [B, D] (cast to the store dtype)."""
        self._raise_failure()
        if self._done:
            raise StoreError(f"{self.path.name}: step {step} written after the writer was closed")
        if self._last_step is not None and step <= self._last_step:
            raise StoreError(f"{self.path.name}: step {step} written after step {self._last_step}; steps must ascend")
        if set(layers) != set(self.layer_dims):
            raise StoreError(
                f"{self.path.name}: step {step} has layers {sorted(layers)}, expected {sorted(self.layer_dims)}"
            )
        n = len(sample_ids)
        if len(weights) != n:
            raise StoreError(f"{self.path.name}: step {step}: {len(weights)} weights for {n} sample ids")
        for name, d in self.layer_dims.items():
            shape = tuple(layers[name].shape)
            if shape != (n, d):
                raise StoreError(f"{self.path.name}: step {step}, layer {name!r}: shape {shape}, expected {(n, d)}")
        rows = self._host_rows(step, sample_ids, weights, [layers[name] for name in self.layer_dims])
        if self._queue is None:
            self._writer.write_batch(self._batch(rows))
        else:
            self._queue.put(rows)
        self._last_step = step

    def write_step(self, record: StepGrads) -> None:
        self.write(record.step, record.sample_ids, record.weights, record.grads)

    def write_steps(self, records: list[StepGrads]) -> None:
        for r in records:
            self.write_step(r)

    def _host_rows(
        self, step: int, sample_ids: torch.Tensor, weights: torch.Tensor, layers: list[torch.Tensor]
    ) -> _HostRows:
        """The rows in host memory in the store's dtypes; copies (never views) when asynchronous."""
        ready: dict[torch.device, torch.cuda.Event] = {}

        def host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            t = t.detach()
            if not self.asynchronous:
                return t.to("cpu", dtype)
            if t.is_cuda:  # pinned host buffer, copy queued on the current stream; the thread waits for it
                out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
                out.copy_(t.to(dtype), non_blocking=True)
                if t.device not in ready:
                    ready[t.device] = torch.cuda.Event()
                return out
            return t.to("cpu", dtype, copy=True)

        ids, w = host(torch.as_tensor(sample_ids), torch.int64), host(torch.as_tensor(weights), torch.float64)
        out = [host(g, self._torch_dtype) for g in layers]
        for dev, event in ready.items():
            event.record(torch.cuda.current_stream(dev))
        return _HostRows(step, ids, w, out, list(ready.values()))

    def _batch(self, rows: _HostRows) -> pa.RecordBatch:
        n = len(rows.sample_ids)
        cols = [
            pa.array(np.full(n, rows.step, dtype=np.int64)),
            pa.array(rows.sample_ids.numpy()),
            pa.array(rows.weights.numpy()),
        ]
        for g, d in zip(rows.layers, self.layer_dims.values()):
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(_store_values(g)), d))
        return pa.record_batch(cols, schema=self.schema)

    def _drain(self) -> None:
        """The writer thread: write queued steps in order until the ``None`` sentinel."""
        while (rows := self._queue.get()) is not None:
            if self._failure is not None or self._aborting:
                continue  # keep draining so that a blocked write() returns; nothing more is written
            try:
                for event in rows.ready:
                    event.synchronize()
                self._writer.write_batch(self._batch(rows))
            except BaseException as e:  # surfaced by the next write() or close()
                self._failure = (rows.step, e)

    # --- finishing ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Steps handed to the writer thread and not yet written (0 when synchronous)."""
        return self._queue.qsize() if self._queue is not None else 0

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        self._discard()
        step, e = self._failure
        raise StoreError(
            f"{self.path}: writing step {step} failed in the background writer ({type(e).__name__}: {e}); "
            "the segment file was not written"
        ) from e

    def _discard(self) -> None:
        """Stop the thread, close and delete the temp file (errors while closing are moot)."""
        self._aborting = True
        self._stop_thread()
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._sink.close()
        self._tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Write what is queued, finish the file and move it into place (recorded in a run's manifest)."""
        if self._done:
            self._raise_failure()
            raise StoreError(f"{self.path.name}: close() after the writer was closed or aborted")
        self._stop_thread()
        self._raise_failure()
        try:
            self._writer.close()
            self._sink.close()
        except BaseException:
            self._discard()
            raise
        self._done = True
        finalize(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (queued steps are not written); nothing appears under the final name."""
        self._discard()

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


_SHARD = re.compile(r"-rank-(\d+)\.arrow$")


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """The shard of rank ``rank`` of the segment whose shard (of any rank) is ``path``."""
    path = Path(path)
    return path.with_name(_SHARD.sub(f"-rank-{rank}.arrow", path.name))


def read_segment(
    path: str | os.PathLike, expected_steps: range | None = None, kind: str | None = None, vectors: bool = True
) -> list[StepGrads]:
    """Memory-map a store file; each step's rows become zero-copy tensors over the mapping.

    Returns the steps in ascending order (``grads`` holds embeddings for an embeddings file; float32
    for a half-precision store). vectors=False: steps, sample ids and weights only (``grads`` empty;
    the vector columns are neither touched nor converted). A shard of a segment written by several
    ranks: every shard of the segment, merged into global steps (rows in rank order; copies, not views).
    Raises StoreError naming the file when it is missing, truncated, of another schema version,
    or lacks some of ``expected_steps``; naming the shard when one is missing, covers other steps than
    the others, or claims a sample another rank's shard has in the same step.
    """
    path = Path(path)
    records, meta = _read_file(path, expected_steps, kind, vectors)
    world = int(meta.get("world_size", 1))
    if world == 1:
        return records
    return _merge_shards(path, int(meta["rank"]), world, records, expected_steps, kind, vectors)


def _span(steps: list[int]) -> str:
    return f"{steps[0]}..{steps[-1]}" if steps else "none"


def _merge_shards(
    path: Path,
    rank: int,
    world: int,
    records: list[StepGrads],
    expected_steps: range | None,
    kind: str | None,
    vectors: bool,
) -> list[StepGrads]:
    """The global steps of a segment from its ``world`` shards (``path``: rank ``rank``'s, read as ``records``)."""
    named = _SHARD.search(path.name)
    if named is None or int(named.group(1)) != rank:
        raise StoreError(f"{path}: holds the shard of rank {rank} (of {world}); the file name says otherwise")
    shards: list[tuple[Path, list[StepGrads]]] = []
    for r in range(world):
        p = shard_path(path, r)
        if r == rank:
            shards.append((p, records))
            continue
        if not p.exists():
            raise StoreError(
                f"{p}: missing — the shard of rank {r}; this segment was trained by {world} ranks and "
                f"rank {r}'s gradients are not there (did rank {r} die?)"
            )
        recs, meta = _read_file(p, expected_steps, kind, vectors)
        got = (int(meta.get("rank", 0)), int(meta.get("world_size", 1)))
        if got != (r, world):
            raise StoreError(f"{p}: holds the shard of rank {got[0]} of {got[1]}, expected rank {r} of {world}")
        shards.append((p, recs))
    first, steps0 = shards[0][0], [x.step for x in shards[0][1]]
    for p, recs in shards[1:]:
        steps = [x.step for x in recs]
        if steps != steps0:
            raise StoreError(
                f"{p}: covers steps {_span(steps)} ({len(steps)}), {first.name} steps {_span(steps0)} "
                f"({len(steps0)}); the shards of one segment must cover the same steps"
            )
    merged = []
    for i, step in enumerate(steps0):
        parts = [recs[i] for _, recs in shards]
        _check_disjoint(step, [torch.unique(x.sample_ids) for x in parts], [p for p, _ in shards])
        merged.append(
            StepGrads(
                step=step,
                sample_ids=torch.cat([x.sample_ids for x in parts]),
                weights=torch.cat([x.weights for x in parts]),
                grads={n: torch.cat([x.grads[n] for x in parts]) for n in parts[0].grads},
            )
        )
    return merged


def _check_disjoint(step: int, ids: list[torch.Tensor], paths: list[Path]) -> None:
    """StoreError naming both shards when two ranks' rows of ``step`` share a sample id (ids: unique per rank)."""
    every = torch.cat(ids)
    if len(torch.unique(every)) == len(every):
        return
    owner = torch.cat([torch.full((len(x),), r) for r, x in enumerate(ids)])
    values, counts = torch.unique(every, return_counts=True)
    z = int(values[counts > 1][0])
    a, b = owner[every == z][:2].tolist()
    raise StoreError(
        f"{paths[b]}: step {step}: sample_id {z} is also in {paths[a].name} (rank {a}); the shards overlap — "
        "each sample of a step belongs to one rank's batch"
    )


def _read_file(
    path: Path, expected_steps: range | None, kind: str | None, vectors: bool
) -> tuple[list[StepGrads], dict[str, str]]:
    """One store file's steps (zero-copy) and its schema metadata."""
    if not path.exists():
        raise StoreError(f"{path}: no such store file")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{path}: truncated or not an Arrow IPC file ({e})") from e
    meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
    version = meta.get("dvemb_schema_version")
    if version not in (str(SCHEMA_VERSION), str(HALF_SCHEMA_VERSION)):
        raise StoreError(
            f"{path}: store schema version {version!r}, this dvemb reads {SCHEMA_VERSION} and {HALF_SCHEMA_VERSION}"
        )
    dtype = meta.get("dtype", "float32")
    if dtype not in TORCH_DTYPES:
        raise StoreError(f"{path}: unknown store dtype {dtype!r}")
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
        for name, d in layer_dims.items() if vectors else ():
            col = b.column(name)
            if col.null_count:
                raise StoreError(f"{path}: step {step}, layer {name!r} has null rows")
            values = _view(col.values, path, name).view(-1, d)[col.offset : col.offset + len(col)]
            grads[name] = _vectors(values, dtype)
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
    return records, meta


class SegmentedRecords(Sequence[StepGrads]):
    """The steps ``start .. stop - 1`` of a run stored in consecutive segment files, read a segment at a time.

    files[j] holds the steps ``bounds[j] .. bounds[j + 1] - 1``. Indexing and iterating (forwards or
    ``reversed``) map one segment file and keep only that one: a pass over the run holds one segment,
    not the run. A record handed out stays valid after the sequence moves on (it keeps its own mapping
    alive). A slice (step 1) is a new sequence over the sub-range; nothing is read until indexed.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        bounds: Sequence[int],
        kind: str | None = None,
        start: int | None = None,
        stop: int | None = None,
    ):
        if len(bounds) != len(files) + 1:
            raise ValueError(f"{len(files)} segment files need {len(files) + 1} boundaries, got {len(bounds)}")
        self.files, self.bounds, self.kind = [Path(f) for f in files], list(bounds), kind
        self.start = self.bounds[0] if start is None else start
        self.stop = self.bounds[-1] if stop is None else stop
        self._loaded: tuple[int, list[StepGrads]] | None = None  # (segment, its records)

    def __len__(self) -> int:
        return self.stop - self.start

    def _segment_records(self, j: int) -> list[StepGrads]:
        if self._loaded is None or self._loaded[0] != j:
            self._loaded = None  # drop the previous segment before mapping the next
            b = self.bounds
            self._loaded = (j, read_segment(self.files[j], range(b[j], b[j + 1]), kind=self.kind))
        return self._loaded[1]

    @overload
    def __getitem__(self, i: int) -> StepGrads: ...

    @overload
    def __getitem__(self, i: slice) -> SegmentedRecords: ...

    def __getitem__(self, i: int | slice) -> StepGrads | SegmentedRecords:
        if isinstance(i, slice):
            lo, hi, stride = i.indices(len(self))
            if stride != 1:
                raise ValueError("SegmentedRecords slices must be contiguous (step 1)")
            return SegmentedRecords(self.files, self.bounds, self.kind, self.start + lo, self.start + max(lo, hi))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} outside 0..{len(self) - 1}")
        step = self.start + i
        j = bisect.bisect_right(self.bounds, step) - 1
        return self._segment_records(j)[step - self.bounds[j]]

    def __iter__(self) -> Iterator[StepGrads]:
        for i in range(len(self)):
            yield self[i]

    def __reversed__(self) -> Iterator[StepGrads]:
        for i in reversed(range(len(self))):
            yield self[i]

    def release(self) -> None:
        """Forget the segment held (it is unmapped once no record of it is referenced)."""
        self._loaded = None


def write_projection(
    path: str | os.PathLike,
    specs: dict[str, LayerProjection],
    cfg: ProjectionConfig,
    skipped: dict[str, str] | None = None,
) -> None:
    """Write ``projection.json``: per-layer dims, k_a, k_s, seeds, dtype, layer kind, parameters;
    ``skipped``: modules the layer spec matched that are not captured (name -> why)."""
    write_json(
        path,
        {
            "schema_version": SCHEMA_VERSION,
            "dtype": cfg.dtype,
            "base_seed": cfg.seed,
            "layers": {n: s.to_json() for n, s in specs.items()},
            "skipped": skipped or {},
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
        for f in ("kind", "layer", "bias", "d_in", "d_out", "k_a", "k_s", "seed"):
            if getattr(s, f) != getattr(other[name], f):
                raise ProjectionMismatchError(
                    f"{where}: layer {name!r} has {f}={getattr(other[name], f)}, the store has {getattr(s, f)}"
                )
