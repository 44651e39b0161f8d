"""The asynchronous SegmentWriter: same bytes as the synchronous one, write() never waits on the disk,
bounded memory, background errors surface on the next write()/close(), abort leaves no file."""

import threading
import time
from pathlib import Path

import pytest
import torch

from dvemb.errors import StoreError
from dvemb.store.gradstore import SegmentWriter, read_segment
from dvemb.types import StepGrads

DIMS = {"fc1": 6, "fc2": 4}


def records(n: int, dtype=torch.float32, first: int = 0, batch: int = 3) -> list[StepGrads]:
    gen = torch.Generator().manual_seed(first + 17)
    return [
        StepGrads(
            step=t,
            sample_ids=torch.arange(batch) + 10 * t,
            weights=torch.rand(batch, generator=gen, dtype=torch.float64),
            grads={k: torch.randn(batch, d, generator=gen, dtype=dtype) for k, d in DIMS.items()},
        )
        for t in range(first, first + n)
    ]


class GatedFile:
    """A real file whose write() blocks until ``gate`` is set and raises ``fail`` on write call ``fail_at``."""

    def __init__(self, path: Path, gate: threading.Event | None = None, fail_at: int | None = None):
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close(), called by the writer)
        self.gate, self.fail_at, self.calls = gate, fail_at, 0
        self.failed = threading.Event()

    def write(self, data) -> int:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait()
        if self.fail_at is not None and self.calls >= self.fail_at:
            self.failed.set()
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed


def gated(gate: threading.Event | None = None, fail_at: int | None = None):
    files: list[GatedFile] = []

    def opener(path: Path) -> GatedFile:
        files.append(GatedFile(path, gate, fail_at))
        return files[-1]

    return opener, files


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dvemb-store")]


@pytest.mark.parametrize(("store", "source"), [("float32", torch.float32), ("float64", torch.float32)])
def test_async_file_is_byte_identical_to_sync(tmp_path, store, source):
    recs = records(5, source)
    recs[2].grads["fc1"] = torch.randn(6, 3, dtype=torch.float64).T  # non-contiguous, other dtype: cast
    for mode in (False, True):
        with SegmentWriter(tmp_path / f"{mode}.arrow", DIMS, dtype=store, asynchronous=mode) as w:
            w.write_steps(recs)
    sync, asyn = (tmp_path / "False.arrow").read_bytes(), (tmp_path / "True.arrow").read_bytes()
    assert sync == asyn
    back = read_segment(tmp_path / "True.arrow", expected_steps=range(5))
    assert torch.equal(back[2].grads["fc1"], recs[2].grads["fc1"].to(getattr(torch, store)))
    assert writer_threads() == []


def test_default_mode_follows_kind(tmp_path):
    """Training-time kinds are written in the background; embeddings (a batch job) synchronously."""
    writers = [SegmentWriter(tmp_path / f"{k}.arrow", DIMS, kind=k) for k in ("grads", "curvature", "embeddings")]
    assert [w.asynchronous for w in writers] == [True, True, False]
    for w in writers:
        w.abort()
    assert writer_threads() == []


def test_write_returns_while_the_disk_is_blocked_and_keeps_the_values_at_write_time(tmp_path):
    gate = threading.Event()
    opener, files = gated(gate)
    recs = records(4)
    expected = [{k: g.clone() for k, g in r.grads.items()} for r in recs]
    w = SegmentWriter(tmp_path / "seg.arrow", DIMS, opener=opener)
    t0 = time.perf_counter()
    w.write_steps(recs)  # the disk has not accepted a byte yet
    assert time.perf_counter() - t0 < 5.0  # would never return if write() waited on the gate
    assert files[0].f.tell() == 0
    for r in recs:  # the caller reuses its buffers
        for g in r.grads.values():
            g.fill_(float("nan"))
    assert w.pending >= len(recs) - 1  # the thread holds at most one step, blocked in the file
    gate.set()
    w.close()
    back = read_segment(tmp_path / "seg.arrow", expected_steps=range(4))
    for b, e in zip(back, expected):
        assert all(torch.equal(b.grads[k], e[k]) for k in DIMS)


def test_queue_is_bounded(tmp_path):
    """queue_steps = 2: one step in the (blocked) thread + 2 queued; the 4th write waits for the disk."""
    gate = threading.Event()
    opener, _ = gated(gate)
    w = SegmentWriter(tmp_path / "seg.arrow", DIMS, queue_steps=2, opener=opener)
    done: list[int] = []

    def produce() -> None:
        for r in records(6):
            w.write_step(r)
            done.append(r.step)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 10
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # had the queue no bound, the producer would finish now
    assert done == [0, 1, 2]
    gate.set()
    producer.join(10)
    assert done == list(range(6))
    w.close()
    assert [r.step for r in read_segment(tmp_path / "seg.arrow")] == list(range(6))


def test_background_error_surfaces_on_next_write_and_leaves_no_file(tmp_path):
    opener, files = gated(fail_at=1)
    w = SegmentWriter(tmp_path / "seg.arrow", DIMS, opener=opener)
    w.write_step(records(1)[0])  # pyarrow writes the header with the first row batch: it fails
    assert files[0].failed.wait(10)
    with pytest.raises(StoreError, match=r"seg\.arrow: writing step 0 failed in the background writer \(OSError"):
        for r in records(1000, first=1):  # the thread records the error right after the raise
            w.write_step(r)
            time.sleep(0.001)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temp file
    with pytest.raises(StoreError, match="writing step 0 failed"):
        w.close()  # still refused: never a file that looks complete
    w.abort()
    assert writer_threads() == []


def test_background_error_surfaces_on_close(tmp_path):
    opener, _ = gated(fail_at=1)
    with (
        pytest.raises(StoreError, match="No space left on device"),
        SegmentWriter(tmp_path / "s.arrow", DIMS, opener=opener) as w,
    ):
        w.write_step(records(1)[0])
    assert list(tmp_path.iterdir()) == []


def test_abort_drops_queued_steps_and_leaves_no_file(tmp_path):
    gate = threading.Event()
    opener, _ = gated(gate)
    w = SegmentWriter(tmp_path / "seg.arrow", DIMS, opener=opener)
    w.write_steps(records(5))
    gate.set()
    w.abort()
    assert list(tmp_path.iterdir()) == [] and writer_threads() == []
    with pytest.raises(StoreError, match="written after the writer was closed"):
        w.write_step(records(1, first=9)[0])


def test_bad_rows_are_refused_in_the_callers_thread(tmp_path):
    with SegmentWriter(tmp_path / "a.arrow", DIMS) as w:
        bad = records(1)[0]
        bad.weights = bad.weights[:2]
        with pytest.raises(StoreError, match=r"a\.arrow: step 0: 2 weights for 3 sample ids"):
            w.write_step(bad)
        w.write_step(records(1)[0])
    assert [r.step for r in read_segment(tmp_path / "a.arrow")] == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned-memory copies)")
def test_cuda_rows_are_copied_before_the_source_changes(tmp_path):
    recs = records(4, torch.float32, batch=64)
    on_gpu = [StepGrads(r.step, r.sample_ids, r.weights, {k: g.cuda() for k, g in r.grads.items()}) for r in recs]
    on_gpu[1].grads["fc2"] = on_gpu[1].grads["fc2"].to(torch.bfloat16)  # autocast-like dtype: cast on device
    recs[1].grads["fc2"] = recs[1].grads["fc2"].to(torch.bfloat16).float()
    with SegmentWriter(tmp_path / "gpu.arrow", DIMS) as w:
        for r in on_gpu:
            w.write_step(r)
            for g in r.grads.values():  # queued on the same stream after the copy
                g.mul_(0.0).add_(float("nan"))
    with SegmentWriter(tmp_path / "cpu.arrow", DIMS, asynchronous=False) as w:
        w.write_steps(recs)
    assert (tmp_path / "gpu.arrow").read_bytes() == (tmp_path / "cpu.arrow").read_bytes()


def test_closed_segment_is_recorded_in_the_run_manifest(tmp_path):
    """Inside a run directory the finished file gets its size and sha256 in manifest.json; an aborted one nothing."""
    from dvemb.store.integrity import file_digest, read_manifest

    (tmp_path / "run.json").write_text("{}")
    with SegmentWriter(tmp_path / "grads" / "seg-0000-rank-0.arrow", DIMS) as w:
        w.write_steps(records(3))
    with pytest.raises(RuntimeError), SegmentWriter(tmp_path / "grads" / "seg-0001-rank-0.arrow", DIMS) as w:
        w.write_steps(records(2, first=3))
        raise RuntimeError("training died")
    size, sha = file_digest(tmp_path / "grads" / "seg-0000-rank-0.arrow")
    assert read_manifest(tmp_path) == {"grads/seg-0000-rank-0.arrow": {"size": size, "sha256": sha}}
    assert sorted(p.name for p in (tmp_path / "grads").iterdir()) == ["seg-0000-rank-0.arrow"]
