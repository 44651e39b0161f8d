"""The task and model of a recorded run: what every stage after training uses to reach the model."""

from __future__ import annotations

import torch
from torch import nn

from dvemb.config import RunConfig, load_config
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.task import DataInfo, Task, load_task


def run_config(run: RunDir) -> RunConfig:
    """The config recorded in ``run.json`` (as resolved when training started)."""
    return load_config(None, [], base=run.meta()["config"])


def task_of(run: RunDir, cfg: RunConfig | None = None) -> Task:
    """The run's task, constructed from its recorded config (or ``cfg``)."""
    return load_task(cfg or run_config(run))


def data_info(run: RunDir) -> DataInfo:
    """What the model was built for (``model_shape`` in run.json)."""
    return DataInfo.from_dict(run.meta()["model_shape"])


def model_at(run: RunDir, step: int, task: Task | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The run's model with the weights of checkpoint ``step`` (in the checkpoint's dtype unless ``dtype``)."""
    task = task or task_of(run)
    model = task.build_model(data_info(run))
    state = load_tensors(run.checkpoint(step))
    model = model.to(dtype or next(iter(state.values())).dtype)  # before loading: fp32 would round fp64 weights
    model.load_state_dict({k: v.to(dtype) if dtype else v for k, v in state.items()})
    return model
