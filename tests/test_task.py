"""The task boundary: every stage goes through the task; resolution; bad input refused before training;
param groups; variable-length token tables; HF datasets as a source; the number of classes."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.func import functional_call, grad

from dvemb.capture.fisher import fisher_vectors
from dvemb.capture.hooks import GradientCapture
from dvemb.config import ConfigError, load_config
from dvemb.data.datamodule import TableDataset
from dvemb.data.hf import load_hf
from dvemb.data.tables import feature_table, load_source, text_table
from dvemb.errors import TableValidationError
from dvemb.models import MLP, MLPConfig
from dvemb.runtask import model_at
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.task import Task, TaskError, check_batch, load_task, masked_cross_entropy, resolve_task_class
from dvemb.tasks import GPTTask, MLPTask
from dvemb.train.module import param_groups
from dvemb.train.run import train
from dvemb.types import ProjectionConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.subset=64", "data.batch_size=16", "train.epochs=1", "embed.segments=1"]

# ----------------------------------------------------------------------------- the boundary, by grep

FORBIDDEN = ("build_model(cfg.model", "cfg.model.", "cross_entropy(")
ALLOWED = {"dvemb/tasks.py", "dvemb/task.py"}


def test_no_stage_builds_a_model_or_calls_a_loss_itself():
    """Outside the built-in tasks (dvemb/tasks.py, dvemb/models/) and the protocol (dvemb/task.py), no file
    of the package builds a model from cfg.model, reads cfg.model or calls a cross-entropy."""
    offenders = []
    for path in sorted((ROOT / "dvemb").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED or rel.startswith("dvemb/models/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            offenders += [f"{rel}:{i}: {line.strip()}" for s in FORBIDDEN if s in line]
    assert not offenders, "\n".join(offenders)


def test_every_shipped_config_names_its_task_and_model_kind_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)  # user tasks (examples/) resolve from the working directory
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert issubclass(resolve_task_class(cfg.task), Task) and "kind" not in cfg.model.model_dump()
    with pytest.raises(ConfigError, match=r"model.kind was removed.*task: 'gpt'"):
        load_config(None, ["model.kind=gpt"])


# ----------------------------------------------------------------------------- resolution

USER_TASK = """
from torch import nn
from dvemb.task import ClassificationTask, Task


class Tiny(ClassificationTask):
    def __init__(self, cfg=None, width=4):
        super().__init__(cfg)
        self.width = width

    def build_model(self, info):
        return nn.Sequential(nn.Linear(info.d_in, self.width), nn.Tanh(), nn.Linear(self.width, info.n_classes))


class NoBuild(Task):
    pass


NOT_A_CLASS = 3


class NotATask:
    def build_model(self, info):
        return None
"""


def write_module(where: Path, name: str, source: str) -> None:
    (where / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The working directory holds the user's task modules (resolved from it, as `dvemb run` does)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_builtin_and_import_path_resolution(user_dir):
    assert resolve_task_class("mlp") is MLPTask and resolve_task_class("gpt") is GPTTask
    write_module(user_dir, "usertask_ok", USER_TASK)
    cfg = load_config(None, ["task=usertask_ok:Tiny", "task_options={width: 7}"])
    task = load_task(cfg)
    assert type(task).__name__ == "Tiny" and task.width == 7 and task.name == "usertask_ok:Tiny"


@pytest.mark.parametrize(
    "spec,options,message",
    [
        ("nosuchmodule_xyz:Tiny", {}, r"module 'nosuchmodule_xyz' does not import \(ModuleNotFoundError"),
        ("usertask_res:Missing", {}, r"module 'usertask_res' has no attribute 'Missing'"),
        ("usertask_res:NotATask", {}, r"'NotATask' is not a subclass of dvemb.task.Task"),
        ("usertask_res:NOT_A_CLASS", {}, r"'NOT_A_CLASS' is not a subclass"),
        ("usertask_res:NoBuild", {}, r"NoBuild does not implement the required method build_model"),
        ("usertask_res:Tiny", {"depth": 3}, r"constructor rejects task_options \{'depth': 3\}"),
        ("neither", {}, r"not a built-in \(gpt, mlp\) and not an import path"),
    ],
)
def test_resolution_errors_name_the_task_and_what_failed(user_dir, spec, options, message):
    write_module(user_dir, "usertask_res", USER_TASK)
    cfg = load_config(None, [f"task={spec}"]).model_copy(update={"task_options": options})
    with pytest.raises(TaskError, match=rf"task '{re.escape(spec)}': .*{message}"):
        load_task(cfg)


# ----------------------------------------------------------------------------- bad input, before training

BAD_TASKS = """
import math
import torch
from torch import nn
from dvemb.task import ClassificationTask


class Base(ClassificationTask):
    def build_model(self, info):
        return nn.Linear(info.d_in, info.n_classes)


class Reduced(Base):
    def per_sample_loss(self, model, batch):
        return super().per_sample_loss(model, batch).mean()


class NaNLoss(Base):
    def per_sample_loss(self, model, batch):
        loss = super().per_sample_loss(model, batch)
        return torch.where(batch["sample_id"] == batch["sample_id"].max(), math.nan, loss)


class SameIds(Base):
    def sample_ids(self, batch):
        return batch["sample_id"] // 100_000


class NoIds(Base):
    def tables(self, cfg):
        from dvemb.data.tables import load_source

        return {k: t.drop_columns(["sample_id"]) for k, t in load_source("digits").items()}


class Broken(Base):
    def build_model(self, info):
        raise RuntimeError("no GPU here")
"""


@pytest.mark.parametrize(
    "task,error,message",
    [
        ("baduser_imp:Base", TaskError, r"module 'baduser_imp' does not import \(ZeroDivisionError"),
        ("baduser:Reduced", TaskError, r"per_sample_loss\(model, batch\) must return .* shape \[16\]; got .*\[\]"),
        (
            "baduser:NaNLoss",
            TaskError,
            r"per_sample_loss\(model, batch\) is not finite .* 1 sample\(s\), first sample_id",
        ),
        ("baduser:SameIds", TaskError, r"sample_ids\(batch\) are not unique within the batch: sample_id 0 occurs 16"),
        ("baduser:NoIds", TableValidationError, r"tables\(cfg\)\['train'\]: missing required column 'sample_id'"),
        ("baduser:Broken", TaskError, r"build_model\(info\) failed \(RuntimeError: no GPU here\)"),
    ],
)
def test_bad_tasks_are_refused_before_training_and_leave_nothing(user_dir, task, error, message):
    write_module(user_dir, "baduser", BAD_TASKS)
    write_module(user_dir, "baduser_imp", "x = 1 / 0\n")
    run = RunDir(user_dir / "runs" / "bad")
    with pytest.raises(error, match=message):
        train(load_config(ROOT / "configs/digits_mlp.yaml", [f"task={task}", *FAST]), run, progress=False)
    assert not run.root.exists()


def test_check_batch_names_the_missing_sample_id_column():
    batch = {"x": torch.randn(3, 4), "y": torch.tensor([0, 1, 0])}
    with pytest.raises(TaskError, match=r"the batch has no 'sample_id' \(keys: \['x', 'y'\]\)"):
        check_batch(Task(), torch.nn.Linear(4, 2), batch)
    batch["sample_id"] = torch.tensor([5, 6, 7])
    assert check_batch(Task(), torch.nn.Linear(4, 2), batch).shape == (3,)


# ----------------------------------------------------------------------------- the number of classes


def digits_with_label(tmp_path: Path, label: int) -> tuple[Path, Path]:
    t = load_source("digits")
    train, val = t["train"], t["val"]
    labels = train.column("label").to_numpy().copy()
    labels[5] = label
    train = train.set_column(2, "label", pa.array(labels))
    pq.write_table(train, tmp_path / "train.parquet")
    pq.write_table(val, tmp_path / "val.parquet")
    return tmp_path / "train.parquet", tmp_path / "val.parquet"


def test_a_label_outside_the_classes_is_refused_naming_row_and_sample_id(tmp_path):
    tr, va = digits_with_label(tmp_path, 37)
    sid = int(pq.read_table(tr).column("sample_id")[5].as_py())
    sets = [*FAST, "data.source=parquet", f"data.train_path={tr}", f"data.val_path={va}", "data.subset=null"]
    run = RunDir(tmp_path / "run")
    with pytest.raises(
        TableValidationError, match=rf"train table: row 5 \(sample_id {sid}\) has label 37 outside \[0, 10\)"
    ):
        train(load_config(ROOT / "configs/digits_mlp.yaml", [*sets, "data.n_classes=10"]), run, progress=False)
    with pytest.raises(ConfigError, match=r"data.n_classes: the number of classes .* not known"):
        train(load_config(ROOT / "configs/digits_mlp.yaml", sets), run, progress=False)  # no silent 38 classes
    assert not run.root.exists()
    # the built-in source knows its 10 classes; a task may say otherwise
    run = train(load_config(ROOT / "configs/digits_mlp.yaml", FAST), RunDir(tmp_path / "ok"), progress=False)
    assert run.meta()["model_shape"] == {"kind": "features", "d_in": 64, "n_out": 10, "block_size": None}


# ----------------------------------------------------------------------------- param groups


def test_param_groups_decay_first_names_and_lr_multipliers():
    model = MLP(MLPConfig(d_in=3, hidden=(4,), n_classes=2))
    cfg = load_config(None, ["train.weight_decay=0.1", "train.lr=0.5"]).train
    (only,) = param_groups(model, cfg)
    assert only["name"] == "decay" and [n for n, _ in only["params"]] == [n for n, _ in model.named_parameters()]
    cfg = load_config(None, ["train.weight_decay=0.1", "train.lr=0.5", "train.no_decay=['*.bias']",
                             "train.group_lr={no_decay: 2.0}"]).train  # fmt: skip
    decay, no_decay = param_groups(model, cfg, ["layers.0.weight"])
    assert [n for n, _ in decay["params"]] == ["layers.2.weight"]
    assert [n for n, _ in no_decay["params"]] == ["layers.0.weight", "layers.0.bias", "layers.2.bias"]
    assert (decay["weight_decay"], decay["lr"], no_decay["weight_decay"], no_decay["lr"]) == (0.1, 0.5, 0.0, 1.0)


def test_no_decay_group_is_trained_without_decay_at_its_own_lr(tmp_path):
    """fp64 SGD, one step per checkpoint: weights take theta - lr (g + wd theta), biases theta - 2 lr g."""
    sets = [*FAST, "train.precision=64-true", "capture.k_a=null", "capture.k_s=null", "capture.dtype=float64",
            "embed.segments=4", "train.weight_decay=0.1", "train.lr=0.05", "train.no_decay=['*.bias']",
            "train.group_lr={no_decay: 2.0}"]  # fmt: skip
    run = train(load_config(ROOT / "configs/digits_mlp.yaml", sets), RunDir(tmp_path / "r"), progress=False)
    (rec,) = read_segment(run.grads(0), range(0, 1))
    before, after = load_tensors(run.checkpoint(0)), load_tensors(run.checkpoint(1))
    for layer, g in rec.grads.items():
        w = before[f"{layer}.weight"]
        total = g.sum(0).view(w.shape[0], -1)  # [d_out, d_in + 1], the bias column last
        torch.testing.assert_close(
            after[f"{layer}.weight"], w - 0.05 * (total[:, :-1] + 0.1 * w), rtol=1e-12, atol=1e-14
        )
        want_b = before[f"{layer}.bias"] - 2 * 0.05 * total[:, -1]
        torch.testing.assert_close(after[f"{layer}.bias"], want_b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- variable-length token tables

RAGGED_LENGTHS = [9, 4, 7, 2, 9, 5, 3, 8]


def ragged_table(seed: int = 0, vocab: int = 40, offset: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, vocab, size=n) for n in RAGGED_LENGTHS]
    return text_table(rows, np.arange(offset, offset + len(rows)))


def test_ragged_batches_are_padded_and_masked():
    ds = TableDataset(ragged_table())
    b = ds.batch([1, 3, 0])
    assert ds.block_size == 8 and b["x"].shape == (3, 8) and b["mask"].dtype == torch.bool
    assert b["mask"].sum(1).tolist() == [3, 1, 8]
    assert (b["y"][~b["mask"]] == -100).all() and (
        b["x"][0, 4:] == 0
    ).all()  # row of 4 tokens: x = 3 inputs + the last token
    # the masked token-mean loss of a padded row is the loss of the row alone
    logits = torch.randn(3, 8, 40, dtype=torch.float64)
    loss = masked_cross_entropy(logits, b["y"], b["mask"])
    for i, n in enumerate([3, 1, 8]):
        alone = masked_cross_entropy(logits[i : i + 1, :n], b["y"][i : i + 1, :n])
        torch.testing.assert_close(loss[i : i + 1], alone, rtol=1e-12, atol=0)


def test_variable_length_gpt_run_records_exact_per_sample_gradients(tmp_path):
    """A parquet table of ragged token rows trains the GPT; each recorded gradient equals the gradient of that
    row's loss computed alone (no padding) with torch.func (fp64, unprojected)."""
    pq.write_table(ragged_table(0), tmp_path / "train.parquet")
    pq.write_table(ragged_table(1, offset=100), tmp_path / "val.parquet")
    sets = ["data.source=parquet", f"data.train_path={tmp_path / 'train.parquet'}",
            f"data.val_path={tmp_path / 'val.parquet'}", "data.n_classes=40", "data.batch_size=4",
            "data.subset=null", "data.eval_subset=null", "train.epochs=1", "train.precision=64-true",
            "capture.k_a=null", "capture.k_s=null", "capture.dtype=float64", "capture.layers=blocks.*c_*",
            "embed.segments=2", "model.n_layer=1", "model.n_embd=8"]  # fmt: skip
    run = train(load_config(ROOT / "configs/shakespeare_gpt.yaml", sets), RunDir(tmp_path / "r"), progress=False)
    assert run.meta()["model_shape"] == {"kind": "text", "d_in": 0, "n_out": 40, "block_size": 8}
    model = model_at(run, 0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    table = pq.read_table(run.data("train"))
    tokens = {
        int(i): np.asarray(t) for i, t in zip(table.column("sample_id").to_pylist(), table.column("tokens").to_pylist())
    }
    (rec,) = read_segment(run.grads(0), range(0, 1))
    for row, sid in enumerate(rec.sample_ids.tolist()):
        t = torch.as_tensor(tokens[sid], dtype=torch.int64)[None]

        def loss(p, t=t):
            return masked_cross_entropy(functional_call(model, p, (t[:, :-1],)), t[:, 1:])[0]

        g = grad(loss)(params)
        for layer, recorded in rec.grads.items():
            full = torch.cat([g[f"{layer}.weight"], g[f"{layer}.bias"][:, None]], 1).flatten()
            torch.testing.assert_close(recorded[row], rec.weights[row] * full, rtol=1e-9, atol=1e-13)


def test_fisher_mc_on_padded_sequences_estimates_the_masked_token_mean_fisher():
    """One Linear on [B, S, d] with padding: the MC curvature rows match the exact Fisher of the masked
    token mean, sum_s (m_s / n)^2 sum_c p_sc ((p_s - e_c) x [a_s, 1])^2 (labels drawn per token)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4)).double()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    batch = {"sample_id": torch.tensor([4, 9]), "x": x, "y": torch.zeros(2, 3, dtype=torch.int64), "mask": mask}
    k = 20000
    mc = fisher_vectors(model, cap, batch, 0.5, "fisher_mc", k, generator=torch.Generator().manual_seed(0))
    got = (mc.grads["0"].T * mc.weights) @ mc.grads["0"]
    p = torch.softmax(model(x), -1).detach()
    a = torch.cat([x, torch.ones(2, 3, 1, dtype=torch.float64)], -1)
    want = torch.zeros_like(got)
    for z in range(2):
        n = mask[z].sum()
        for s in range(3):
            for c in range(4):
                v = torch.outer(p[z, s] - torch.eye(4, dtype=torch.float64)[c], a[z, s]).flatten() * mask[z, s] / n
                want += 0.5 * p[z, s, c] * torch.outer(v, v)
    assert float((got - want).norm() / want.norm()) < 0.03
    cap.remove()


def test_curvature_refuses_a_task_whose_loss_is_not_on_its_logits():
    class Hinge(Task):
        name = "hinge"

        def per_sample_loss(self, model, batch):
            return torch.relu(1 - model(batch["x"]).max(-1).values)

    model = MLP(MLPConfig(d_in=3, hidden=(4,), n_classes=2))
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None))
    with pytest.raises(TaskError, match=r"task 'hinge': curvature 'fisher' needs logits\(model, batch\)"):
        fisher_vectors(model, cap, torch.randn(2, 3), 0.5, "fisher", task=Hinge())
    assert Hinge().per_sample_accuracy(model, {"x": torch.randn(2, 3)}) is None


# ----------------------------------------------------------------------------- HF datasets as a source


def test_hf_saved_dataset_and_parquet_files_as_the_source(tmp_path):
    import datasets

    t = load_source("digits")
    train_ds = datasets.Dataset(datasets.table.InMemoryTable(t["train"])).shuffle(
        seed=0
    )  # an indices mapping: rows are read through it
    train_ds.save_to_disk(str(tmp_path / "train_ds"))
    pq.write_table(t["val"].slice(0, 60), tmp_path / "val-0.parquet")
    pq.write_table(t["val"].slice(60), tmp_path / "val-1.parquet")
    (tmp_path / "val").mkdir()
    for f in ("val-0.parquet", "val-1.parquet"):
        (tmp_path / f).rename(tmp_path / "val" / f)
    sets = [*FAST, "data.source=hf", f"data.train_path={tmp_path / 'train_ds'}", f"data.val_path={tmp_path / 'val'}",
            "data.n_classes=10"]  # fmt: skip
    run = train(load_config(ROOT / "configs/digits_mlp.yaml", sets), RunDir(tmp_path / "r"), progress=False)
    assert run.meta()["status"] == "trained"
    val = pl.read_parquet(run.data("val"))
    assert val["sample_id"].to_list() == t["val"].column("sample_id").to_pylist()  # both files, in order
    got = pl.read_parquet(run.data("train"))
    assert got.height == 64 and got["sample_id"].n_unique() == 64
    assert set(got["sample_id"].to_list()) <= set(t["train"].column("sample_id").to_pylist())
    # a path that is no dataset is named
    (tmp_path / "empty").mkdir()
    with pytest.raises(TableValidationError, match="empty: neither a saved dataset nor Parquet files"):
        load_hf(tmp_path / "empty")


def test_feature_tables_keep_working_without_a_task_file(tmp_path):
    """A user parquet feature table with data.n_classes trains the built-in MLP end to end."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5))
    y = (x[:, 0] > 0).astype(np.int64)
    pq.write_table(feature_table(x[:60], y[:60], np.arange(60)), tmp_path / "train.parquet")
    pq.write_table(feature_table(x[60:], y[60:], np.arange(60, 80)), tmp_path / "val.parquet")
    sets = [*FAST, "data.source=parquet", f"data.train_path={tmp_path / 'train.parquet'}",
            f"data.val_path={tmp_path / 'val.parquet'}", "data.n_classes=2"]  # fmt: skip
    run = train(load_config(ROOT / "configs/digits_mlp.yaml", sets), RunDir(tmp_path / "r"), progress=False)
    assert run.meta()["model_shape"] == {"kind": "features", "d_in": 5, "n_out": 2, "block_size": None}
