"""Arrow gradient store: round trip, zero-copy reads, atomic writes, and clear errors on bad files."""

import json

import pyarrow as pa
import pytest
import torch

from dvemb.capture.hooks import GradientCapture
from dvemb.errors import ProjectionMismatchError, StoreError
from dvemb.models import MLP, MLPConfig
from dvemb.score.validation import validation_gradients
from dvemb.store.gradstore import SegmentWriter, read_projection, read_segment, write_projection
from dvemb.task import Task
from dvemb.types import ProjectionConfig, StepGrads

DIMS = {"fc1": 6, "fc2": 4}


def steps(first: int, n: int, dtype=torch.float32) -> list[StepGrads]:
    gen = torch.Generator().manual_seed(first)
    return [
        StepGrads(
            step=t,
            sample_ids=torch.arange(3) + 10 * t,
            weights=torch.full((3,), 1 / 3, dtype=torch.float64),
            grads={k: torch.randn(3, d, generator=gen, dtype=dtype) for k, d in DIMS.items()},
        )
        for t in range(first, first + n)
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact_and_zero_copy(tmp_path, dtype):
    recs = steps(5, 4, getattr(torch, dtype))
    path = tmp_path / "seg-0000-rank-0.arrow"
    with SegmentWriter(path, DIMS, dtype=dtype) as w:
        w.write_steps(recs)
    before = pa.total_allocated_bytes()
    back = read_segment(path, expected_steps=range(5, 9), kind="grads")
    assert pa.total_allocated_bytes() == before  # nothing copied into Arrow's heap: views of the mmap
    assert [r.step for r in back] == [5, 6, 7, 8]
    for a, b in zip(back, recs):
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.weights, b.weights)
        for k in DIMS:
            assert a.grads[k].dtype == getattr(torch, dtype)
            assert torch.equal(a.grads[k], b.grads[k])


def test_crash_while_writing_leaves_no_file(tmp_path):
    path = tmp_path / "seg.arrow"
    with pytest.raises(RuntimeError), SegmentWriter(path, DIMS) as w:
        w.write_step(steps(0, 1)[0])
        raise RuntimeError("training died")
    assert list(tmp_path.iterdir()) == []  # neither the final file nor a temp file


def test_existing_file_survives_failed_rewrite(tmp_path):
    path = tmp_path / "seg.arrow"
    with SegmentWriter(path, DIMS) as w:
        w.write_steps(steps(0, 2))
    with pytest.raises(RuntimeError), SegmentWriter(path, DIMS) as w:
        raise RuntimeError("boom")
    assert [r.step for r in read_segment(path)] == [0, 1]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "seg.arrow"
    with SegmentWriter(path, DIMS) as w:
        w.write_steps(steps(0, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"seg\.arrow: truncated or not an Arrow IPC file"):
        read_segment(path)


def test_missing_steps_are_named(tmp_path):
    path = tmp_path / "seg.arrow"
    with SegmentWriter(path, DIMS) as w:
        recs = steps(0, 6)
        w.write_steps(recs[:2] + recs[4:])
    with pytest.raises(StoreError, match=r"seg\.arrow: segment should cover steps 0\.\.5; missing steps \[2, 3\]"):
        read_segment(path, expected_steps=range(0, 6))


def test_writer_refuses_bad_rows(tmp_path):
    with SegmentWriter(tmp_path / "a.arrow", DIMS) as w:
        w.write_step(steps(3, 1)[0])
        with pytest.raises(StoreError, match="step 2 written after step 3"):
            w.write_step(steps(2, 1)[0])
        bad = steps(4, 1)[0]
        bad.grads["fc2"] = torch.zeros(3, 7)
        with pytest.raises(StoreError, match=r"step 4, layer 'fc2': shape \(3, 7\), expected \(3, 4\)"):
            w.write_step(bad)


def test_wrong_schema_version_is_refused(tmp_path):
    path = tmp_path / "seg.arrow"
    table = pa.table({"step": [0]}).replace_schema_metadata({"dvemb_schema_version": "99"})
    with pa.ipc.new_file(str(path), table.schema) as f:
        f.write_table(table)
    with pytest.raises(StoreError, match="schema version '99'"):
        read_segment(path)


def test_validation_projection_mismatch_is_named(tmp_path):
    torch.manual_seed(0)
    model = MLP(MLPConfig(d_in=10, hidden=(8,), n_classes=3))
    train_cap = GradientCapture(model, ProjectionConfig(k_a=4, k_s=4, seed=1))
    write_projection(tmp_path / "projection.json", train_cap.specs, train_cap.config)
    stored = read_projection(tmp_path / "projection.json")
    assert json.loads((tmp_path / "projection.json").read_text())["layers"]["layers.0"]["k_a"] == 4
    batches = [{"sample_id": torch.arange(5), "x": torch.randn(5, 10), "y": torch.randint(0, 3, (5,))}]
    ok = validation_gradients(
        Task(), model, GradientCapture(model, ProjectionConfig(k_a=4, k_s=4, seed=1)), batches, store_projection=stored
    )
    assert ok["layers.0"].shape == (1, 16)
    with pytest.raises(ProjectionMismatchError, match=r"layer 'layers.0' has seed=\d+, the store has \d+"):
        validation_gradients(
            Task(),
            model,
            GradientCapture(model, ProjectionConfig(k_a=4, k_s=4, seed=2)),
            batches,
            store_projection=stored,
        )
    with pytest.raises(ProjectionMismatchError, match=r"layer 'layers.0' has k_a=5, the store has 4"):
        validation_gradients(
            Task(),
            model,
            GradientCapture(model, ProjectionConfig(k_a=5, k_s=4, seed=1)),
            batches,
            store_projection=stored,
        )
