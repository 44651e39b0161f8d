"""Mislabel detection by lowest value: DVEmb vs grad-dot vs training loss, and the metrics (AUROC, P@k).

Every detector returns a table ``sample_id, value`` where *low* value = suspected harmful / mislabeled.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from sklearn.metrics import roc_auc_score

from dvemb.config import RunConfig
from dvemb.data import TableDataModule
from dvemb.eval.baselines import grad_dot
from dvemb.runtask import model_at, task_of
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_schedule


def dvemb_values(run: RunDir) -> pl.DataFrame:
    """DVEmb all-epoch value (scores/samples.parquet ``value``)."""
    return pl.read_parquet(run.samples, columns=["sample_id", "value"])


def grad_dot_values(run: RunDir, cfg: RunConfig) -> pl.DataFrame:
    """TracIn-like grad-dot: ``sum_t eta_t <grad l_val(theta_T), g_{t,z}>`` over occurrences, same projected grads."""
    from dvemb.score.run import val_vectors  # local: score.run imports this package's siblings

    b = run.boundaries
    v = val_vectors(run, cfg, b[-1])
    schedule = read_schedule(run)  # each layer's own param-group LR
    ids, vals = [], []
    for j in range(len(b) - 1):
        records = read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")
        for rec, s in zip(records, grad_dot(records, schedule, v)):
            ids.append(rec.sample_ids.numpy().copy())
            vals.append(s[:, 0].numpy())
    df = pl.DataFrame({"sample_id": np.concatenate(ids), "value": np.concatenate(vals)})
    return df.group_by("sample_id").agg(pl.col("value").sum()).sort("sample_id")


def loss_values(run: RunDir, cfg: RunConfig) -> pl.DataFrame:
    """Minus the per-sample training loss of the final model (high loss = suspicious = low value)."""
    task = task_of(run, cfg)
    model = model_at(run, run.boundaries[-1], task).eval()
    dtype = next(model.parameters()).dtype
    ds = TableDataModule(run.data("train"), batch_size=1024, shuffle=False, dtype=dtype).datasets["train"]
    with torch.no_grad():
        b = ds.batch(np.arange(len(ds)))
        loss = task.per_sample_loss(model, b).to(torch.float64)
    return pl.DataFrame({"sample_id": b["sample_id"].numpy(), "value": (-loss).numpy()}).sort("sample_id")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking ``positive`` first (ties count one half); NaN if one class."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def detection_metrics(values: pl.DataFrame, corrupted: np.ndarray) -> dict[str, float]:
    """AUROC of ``-value`` for the corrupted ids and precision among the ``len(corrupted)`` lowest values."""
    bad = np.isin(values["sample_id"].to_numpy(), np.asarray(corrupted))
    v = values["value"].to_numpy().astype(np.float64)
    k = int(bad.sum())
    lowest = np.lexsort((values["sample_id"].to_numpy(), v))[:k]
    return {
        "auroc": auroc(-v, bad),
        "precision_at_k": float(bad[lowest].mean()) if k else float("nan"),
        "k": k,
        "n": len(v),
    }
