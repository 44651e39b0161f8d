"""The Lightning side of resuming (dvemb.train.resume): record the state at every inner boundary, and
restore it — optimizer, LR schedulers, AMP scaler, loop counters, RNG — in a resumed run."""

from __future__ import annotations

import lightning as L
import torch

from dvemb.errors import DamagedFileError, StoreError
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.train.resume import SEP, ResumeState, json_state, rng_state, save_state, set_rng_state


def capture(trainer: L.Trainer, names: dict[int, str]) -> ResumeState:
    """The state at the start of the step about to run (call first thing in ``on_train_batch_start``)."""
    tensors, rng = rng_state()
    opt = trainer.optimizers[0]
    spec: dict[str, dict] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if v is None:
                    continue
                if torch.is_tensor(v):
                    where = "param" if v.device == p.device else "cpu"
                    spec[f"{names[id(p)]}{SEP}{key}"] = {"dtype": str(v.dtype).removeprefix("torch."), "device": where}
                else:
                    spec[f"{names[id(p)]}{SEP}{key}"] = {"float": True}
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    loop = trainer.fit_loop.epoch_loop
    return ResumeState(
        step=int(trainer.global_step),
        epoch=int(trainer.current_epoch),
        batch=int(loop.batch_idx),
        micro_batches=int(loop.total_batch_idx),
        group_lr=[float(g["lr"]) for g in opt.param_groups],
        schedulers=[json_state(c.scheduler, "LR scheduler") for c in trainer.lr_scheduler_configs],
        scaler=json_state(scaler, "AMP grad scaler") if scaler is not None else None,
        optimizer_state=spec,
        rng=rng,
        rng_tensors=tensors,
    )


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], run: RunDir, state: ResumeState) -> None:
    """Load ``checkpoints/optimizer-b`` into ``opt``: each entry in its recorded dtype and device, in the
    recorded order (so the state, and every file written from it, is as in the uninterrupted run)."""
    path = run.optimizer_state(state.step)
    saved = load_tensors(path)
    if set(saved) != set(state.optimizer_state):
        extra = sorted(set(saved) ^ set(state.optimizer_state))[:3]
        raise DamagedFileError(f"{path}: damaged — its entries differ from the resume state's (e.g. {extra})")
    params = {names[id(p)]: p for group in opt.param_groups for p in group["params"]}
    opt.state.clear()
    for key, how in state.optimizer_state.items():
        name, entry = key.split(SEP, 1)
        if name not in params:
            raise DamagedFileError(f"{path}: damaged — state for a parameter the model does not have: {name!r}")
        p, v = params[name], saved[key]
        if how.get("float"):
            opt.state[p][entry] = float(v)
        else:
            device = p.device if how["device"] == "param" else torch.device("cpu")
            opt.state[p][entry] = v.to(dtype=getattr(torch, how["dtype"]), device=device)


class Resumer(L.Callback):
    """Saves the resume state at every inner boundary; on a resumed run, restores the one it starts from.

    Put it before :class:`~dvemb.capture.callback.GradientLogger` in the trainer's callbacks: its
    ``on_train_batch_start`` must see (and, resuming, set) the RNG states before anything else runs.
    """

    def __init__(self, run: RunDir, logger, state: ResumeState | None = None):
        """logger: the run's GradientLogger (its segment boundaries); state: where a resumed run starts."""
        self.run, self.logger, self.state = run, logger, state
        self._pending = state is not None  # counters / RNG still to set at the first batch
        self._seen_step: int | None = state.step if state is not None else None
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = {id(p): n for n, p in pl_module.model.named_parameters()}
        s = self.state
        if s is None:
            return
        opt = trainer.optimizers[0]
        restore_optimizer(opt, self._names, self.run, s)
        configs = trainer.lr_scheduler_configs
        if len(configs) != len(s.schedulers) or len(opt.param_groups) != len(s.group_lr):
            raise DamagedFileError(
                f"{self.run.resume_state(s.step)}: {len(s.schedulers)} scheduler(s) and {len(s.group_lr)} param "
                f"group(s) recorded; the rebuilt training has {len(configs)} and {len(opt.param_groups)}"
            )
        for c, sd in zip(configs, s.schedulers, strict=True):
            c.scheduler.load_state_dict(sd)
        for g, lr in zip(opt.param_groups, s.group_lr, strict=True):
            g["lr"] = lr
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and s.scaler:
            scaler.load_state_dict(s.scaler)
        # Lightning's counters as at the start of epoch s.epoch, s.step optimizer steps done; the batches
        # already done in this epoch are added when its first (resumed) batch starts (the epoch loop
        # zeroes its per-epoch counters when the epoch begins).
        fit = trainer.fit_loop
        for t in (fit.epoch_progress.total, fit.epoch_progress.current):
            t.ready = t.started = t.processed = t.completed = s.epoch
        optim = fit.epoch_loop.automatic_optimization.optim_progress.optimizer
        optim.step.total.ready = optim.step.total.completed = s.step
        optim.zero_grad.total.ready = optim.zero_grad.total.started = optim.zero_grad.total.completed = s.step
        t = fit.epoch_loop.batch_progress.total
        t.ready = t.started = t.processed = t.completed = s.micro_batches
        fit.epoch_loop._batches_that_stepped = s.step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._pending:
            self._pending = False
            self._continue_epoch(trainer)
            set_rng_state(self.state.rng_tensors, self.state.rng)
            return
        step = int(trainer.global_step)
        if step == self._seen_step:
            return  # a later micro-batch of the same optimizer step
        self._seen_step = step
        if step in self.logger.boundaries[1:-1] and trainer.world_size == 1:  # multi-rank runs restart instead
            save_state(self.run, capture(trainer, self._names))

    def _continue_epoch(self, trainer: L.Trainer) -> None:
        """The first batch of a resumed run is batch ``state.batch`` of its epoch, not batch 0."""
        i = self.state.batch
        if trainer.current_epoch != self.state.epoch or trainer.global_step != self.state.step:
            raise StoreError(
                f"resume: training continued at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                f"{self.run.resume_state(self.state.step)} says epoch {self.state.epoch}, step {self.state.step}"
            )
        loop = trainer.fit_loop.epoch_loop
        cur = loop.batch_progress.current
        cur.ready, cur.started, cur.processed, cur.completed = i + 1, i, i, i
        fetcher = trainer.fit_loop._data_fetcher
        fetcher.fetched += i
        if fetcher.length is not None:
            fetcher.done = fetcher.fetched >= fetcher.length
        loop.batch_progress.is_last_batch = fetcher.done
