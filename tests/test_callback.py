"""The Lightning GradientLogger records exactly w * grad l_z at the parameters each step saw."""

import polars as pl
import pytest
import torch
from torch.func import functional_call, grad, vmap

from dvemb.config import load_config
from dvemb.data import TableDataModule
from dvemb.runtask import model_at
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.task import masked_cross_entropy
from dvemb.train.run import train


@pytest.mark.parametrize("reduction,accumulate,clip", [("mean", 2, None), ("sum", 1, None), ("mean", 1, 0.2)])
def test_logged_gradients_are_exact_per_sample_gradients(tmp_path, reduction, accumulate, clip):
    """With ``train.grad_clip`` the recorded step is lr' = lr * clip factor, wd' = wd / factor (exact SGD)."""
    steps = 96 // 8 // accumulate
    cfg = load_config(
        "configs/digits_mlp.yaml",
        [
            "train.epochs=1",
            "data.subset=96",
            "data.batch_size=8",
            f"train.accumulate={accumulate}",
            f"train.reduction={reduction}",
            "train.precision=64-true",
            "capture.k_a=null",
            "capture.k_s=null",
            "capture.dtype=float64",
            f"embed.segments={steps}",
            "train.weight_decay=0.01",
            "train.lr=0.05",
            f"train.grad_clip={'null' if clip is None else clip}",
        ],
    )
    run = train(cfg, RunDir(tmp_path / "r"), progress=False)
    assert run.boundaries == list(range(steps + 1))  # a checkpoint before every step
    data = TableDataModule(run.data("train"), dtype="float64")
    batches = pl.read_parquet(run.batches)
    sched = pl.read_parquet(run.steps)
    lr, wd = sched["lr"].to_numpy(), sched["weight_decay"].to_numpy()
    if clip is None:
        assert lr.tolist() == [0.05] * steps and wd.tolist() == [0.01] * steps
    else:  # the gradient norm of this tiny model starts well above 0.2: most steps are clipped
        assert (lr <= 0.05).all() and (lr < 0.05).sum() >= steps // 2
        torch.testing.assert_close(torch.tensor(lr * wd), torch.full((steps,), 0.05 * 0.01, dtype=torch.float64))
    for t in range(steps):
        model = model_at(run, t)
        (rec,) = read_segment(run.grads(t), range(t, t + 1))
        rows = batches.filter(pl.col("step") == t).sort("position")
        assert rec.sample_ids.tolist() == rows["sample_id"].to_list()
        b = data.get_batch(rec.sample_ids.numpy())
        w = 1.0 / (len(rec.sample_ids) if reduction == "mean" else accumulate)
        torch.testing.assert_close(rec.weights, torch.full_like(rec.weights, w))
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, x, y, model=model):
            return masked_cross_entropy(functional_call(model, p, (x[None],)), y[None])[0]

        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, b["x"], b["y"])
        for name in rec.grads:
            full = torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][:, :, None]], dim=2).flatten(1)
            torch.testing.assert_close(rec.grads[name], w * full, rtol=1e-6, atol=1e-12)
        # the recorded step reproduces the next checkpoint: theta' = (1 - lr wd) theta - lr sum_z g_z
        nxt = load_tensors(run.checkpoint(t + 1))
        for name in rec.grads:
            total = rec.grads[name].sum(0).view(params[f"{name}.weight"].shape[0], -1)
            want_w = (1 - lr[t] * wd[t]) * params[f"{name}.weight"] - lr[t] * total[:, :-1]
            torch.testing.assert_close(nxt[f"{name}.weight"], want_w, rtol=1e-9, atol=1e-12)


def test_amp_gradscaler_steps_are_unscaled_and_skipped_steps_recorded(tmp_path):
    """fp16 autocast + GradScaler (CPU): the scale is divided out; overflow-skipped steps get lr 0, zero rows."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    from dvemb.capture.callback import GradientLogger
    from dvemb.task import load_task
    from dvemb.train.module import Trainee
    from dvemb.train.run import build_model, make_datamodule, prepare_data, write_data
    from dvemb.types import ProjectionConfig

    cfg = load_config(
        "configs/digits_mlp.yaml", ["train.epochs=1", "data.subset=192", "capture.k_a=null", "capture.k_s=null"]
    )
    run = RunDir(tmp_path / "amp")
    run.create()
    run.update_meta(config=cfg.model_dump(mode="json"))
    task = load_task(cfg)
    prepared = prepare_data(cfg, task)
    write_data(prepared, run)
    run.update_meta(model_shape=prepared.info.as_dict())
    dm = make_datamodule(cfg, run)
    model = build_model(cfg, task, prepared.info)
    steps = 192 // 32
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=10_000)  # overflows at first
    logger = GradientLogger(run, ProjectionConfig(k_a=None, k_s=None), segments=steps)
    trainer = L.Trainer(
        max_epochs=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[logger],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Trainee(model, cfg.train, task), datamodule=dm)

    lrs = pl.read_parquet(run.steps)["lr"].to_list()
    skipped = [t for t, lr in enumerate(lrs) if lr == 0.0]
    done = [t for t, lr in enumerate(lrs) if lr > 0.0]
    assert skipped and done, lrs  # some steps overflowed, the later ones went through
    data = TableDataModule(run.data("train"))
    for t in range(steps):
        (rec,) = read_segment(run.grads(t), range(t, t + 1))
        before, after = load_tensors(run.checkpoint(t)), load_tensors(run.checkpoint(t + 1))
        if t in skipped:
            assert all(torch.equal(before[k], after[k]) for k in before)  # the update really was skipped
            assert all(float(g.abs().sum()) == 0.0 for g in rec.grads.values())
            assert len(rec.sample_ids) == 32
            continue
        m = model_at(run, t)
        params = {k: v.detach() for k, v in m.named_parameters()}
        b = data.get_batch(rec.sample_ids.numpy())

        def loss_one(p, x, y, m=m):
            return masked_cross_entropy(functional_call(m, p, (x[None],)), y[None])[0]

        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, b["x"], b["y"])
        for name in rec.grads:
            full = torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][:, :, None]], dim=2).flatten(1) / 32
            # fp16 forward/backward: agreement to fp16 accuracy, not off by the 2^k loss scale
            err = (rec.grads[name] - full).norm() / full.norm()
            assert err < 2e-2, (t, name, float(err))
