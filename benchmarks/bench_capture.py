"""Training-loop overhead of per-sample gradient capture (GradientCapture, k = 32x32 per layer).

Two identical copies of each model (same init, same batches) train side by side in one process:
one plain, one with ``GradientCapture`` (every nn.Linear tracked; ``cap.micro_batch`` around the
backward and ``cap.collect(step)`` every step). Timing blocks of a few steps alternate between the
two (ABBA order) and the reported overhead is the median over blocks of time(with) / time(without).

Workloads:

* MLP 784 -> 512 -> 256 -> 10 (relu), B = 128, SGD, MNIST (real when ``dvemb.data`` has it cached
  or can fetch it, else random tensors of the same shape — recorded in the JSON);
* GPT n_layer=4, n_head=4, n_embd=128, block_size=128, B = 8, SGD, random tokens — with a small
  vocabulary (lm_head does not dominate) and, in the full run, the GPT-2 vocabulary (50257);
* on CUDA (or with ``--gpt100m``): GPT-2-small shape, 12 layers x 12 heads x 768, context 512,
  vocabulary 50257 (~124M parameters), B = 8 — samples/s with and without capture.

``--disk``: does capture wait on the store's disk? Each capturing copy also writes every step's rows
to a gradient store (``SegmentWriter``, a fresh file per timing block), synchronously or
asynchronously, on the real disk or on a throttled one (:class:`ThrottledFile`, a benchmark device
whose bandwidth is set so that one step's rows take ``--disk-fraction`` of a plain training step).
Reported: step time of each variant against the plain copy, the time spent inside ``write()``, and
the flush at ``close()``. Results go to ``bench_capture_disk_<device>.json``.

Usage::

    python -m benchmarks.bench_capture            # full run (~4 min on a 2-core CPU)
    python -m benchmarks.bench_capture --quick    # smoke run (< 20 s)
    python -m benchmarks.bench_capture --profile  # also print a torch.profiler table per workload
    python -m benchmarks.bench_capture --disk     # sync vs async store, fast vs slow disk (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from benchmarks.common import bench_args, machine_info, make_sync, write_json_atomic
from dvemb.capture.hooks import GradientCapture, loss_weight
from dvemb.models.gpt import GPT, GPTConfig
from dvemb.models.mlp import MLP, MLPConfig
from dvemb.store.gradstore import SegmentWriter
from dvemb.task import masked_cross_entropy
from dvemb.types import ProjectionConfig

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTION = ProjectionConfig(k_a=32, k_s=32)
TARGET_RATIO = 1.3

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sample ids, inputs, targets


# --------------------------------------------------------------------------- a slow disk (benchmark device)


class ThrottledFile:
    """A real file on a slow disk: writing ``n`` bytes takes ``n / bandwidth`` seconds.

    The delay accrues per byte and is slept in slices of >= 1 ms (sleep is coarse); ``busy_s`` is the
    wall time spent inside write/close, i.e. what a synchronous writer waits per step.
    """

    def __init__(self, path: Path, bandwidth: float):
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close(), called by the SegmentWriter)
        self.bandwidth = bandwidth
        self.busy_s = 0.0
        self._debt = 0.0

    def _pay(self, at_least: float) -> None:
        if self._debt >= at_least:
            t0 = time.perf_counter()
            time.sleep(self._debt)
            self._debt -= time.perf_counter() - t0

    def write(self, data) -> int:
        t0 = time.perf_counter()
        n = self._f.write(data)
        self._debt += n / self.bandwidth
        self._pay(1e-3)
        self.busy_s += time.perf_counter() - t0
        return n

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        t0 = time.perf_counter()
        self._pay(0.0)
        self._f.close()
        self.busy_s += time.perf_counter() - t0

    @property
    def closed(self) -> bool:
        return self._f.closed


@dataclass
class Store:
    """Where a capturing arm writes its rows: a fresh SegmentWriter per timing block, deleted after close."""

    directory: Path
    asynchronous: bool
    bandwidth: float | None = None  # bytes/s of a throttled (slow) disk; None = the real disk
    files: list[ThrottledFile] = field(default_factory=list)

    def open(self, dims: dict[str, int], name: str) -> SegmentWriter:
        def throttled(path: Path) -> ThrottledFile:
            self.files.append(ThrottledFile(path, self.bandwidth))
            return self.files[-1]

        opener = throttled if self.bandwidth is not None else None
        return SegmentWriter(self.directory / f"{name}.arrow", dims, asynchronous=self.asynchronous, opener=opener)

    @property
    def disk_s(self) -> float:
        """Seconds the throttled disk spent writing (0 for the real disk)."""
        return sum(f.busy_s for f in self.files)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[Batch]  # cycled; identical for both arms
    description: dict


def mnist_arrays(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x [n, 784] float in [0, 1], y [n], source): real MNIST via dvemb.data, else random."""
    try:
        from dvemb.data.fetch import load_mnist

        x, y = load_mnist("train")
        return torch.from_numpy(x[:n]).float() / 255.0, torch.from_numpy(y[:n]), "MNIST train (dvemb.data.fetch)"
    except Exception as exc:  # no dvemb.data yet, offline, ... -> same shapes, random values
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        return x, y, f"random tensors (MNIST unavailable: {type(exc).__name__})"


def mlp_workload(device: str, batch: int = 128, n_batches: int = 16) -> Workload:
    torch.manual_seed(0)
    model = MLP(MLPConfig(d_in=784, hidden=(512, 256), n_classes=10, activation="relu")).to(device)
    x, y, source = mnist_arrays(batch * n_batches)
    batches = [
        (
            torch.arange(i * batch, (i + 1) * batch),
            x[i * batch : (i + 1) * batch].to(device),
            y[i * batch : (i + 1) * batch].to(device),
        )
        for i in range(n_batches)
    ]
    desc = {"model": "MLP 784-512-256-10 relu", "batch": batch, "optimizer": "SGD(lr=0.01)", "data": source}
    return Workload("mlp", model, batches, desc)


def gpt_workload(
    device: str, vocab: int, batch: int = 8, n_batches: int = 4, shape: tuple[int, int, int, int] = (4, 4, 128, 128)
) -> Workload:
    """GPT on random tokens; shape = (n_layer, n_head, n_embd, block_size)."""
    torch.manual_seed(0)
    n_layer, n_head, n_embd, block = shape
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n_batches):
        tok = torch.randint(0, vocab, (batch, cfg.block_size + 1), generator=gen)
        batches.append((torch.arange(i * batch, (i + 1) * batch), tok[:, :-1].to(device), tok[:, 1:].to(device)))
    desc = {
        "model": f"GPT n_layer={n_layer} n_head={n_head} n_embd={n_embd} block_size={block} vocab={vocab}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_sample": block,
        "batch": batch,
        "optimizer": "SGD(lr=0.01)",
        "data": "random tokens",
    }
    name = f"gpt_vocab{vocab}" if shape == (4, 4, 128, 128) else f"gpt_{n_layer}x{n_embd}_ctx{block}"
    return Workload(name, model, batches, desc)


# --------------------------------------------------------------------------- training arms


class Arm:
    """One model copy + optimizer; with a ``projection`` each step is wrapped in micro_batch/collect.

    store: also write each step's StepGrads to a gradient store (a fresh file per :meth:`run`).
    amp: autocast dtype of the forward and loss (None = full precision). layers: the capture's layer spec.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        projection: ProjectionConfig | None,
        store: Store | None = None,
        amp: torch.dtype | None = None,
        layers: str | Sequence[str] | None = None,
    ):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.cap = GradientCapture(model, projection, layers) if projection is not None else None
        self.batches = batches
        self.step_no = 0
        self.tracked = len(self.cap.specs) if self.cap else 0
        self.store, self.amp = store, amp
        self.write_s: list[float] = []  # seconds inside SegmentWriter.write per step
        self.close_s: list[float] = []  # seconds of SegmentWriter.close per block (the flush)
        self._writer: SegmentWriter | None = None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            return masked_cross_entropy(self.model(x), y).mean()

    def step(self) -> None:
        ids, x, y = self.batches[self.step_no % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        if self.cap is None:
            self.loss(x, y).backward()
        else:
            with self.cap.micro_batch(ids, weight=loss_weight("mean", len(ids))):
                self.loss(x, y).backward()
            rec = self.cap.collect(self.step_no)
            if self._writer is not None:
                t0 = time.perf_counter()
                self._writer.write_step(rec)
                self.write_s.append(time.perf_counter() - t0)
        self.opt.step()
        self.step_no += 1

    def run(self, steps: int, sync: Callable[[], None]) -> float:
        """Seconds for ``steps`` steps (a store's file is opened before and closed after the timing)."""
        if self.store is not None:
            self._writer = self.store.open({n: s.dim for n, s in self.cap.specs.items()}, f"from-{self.step_no}")
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        elapsed = time.perf_counter() - t0
        if self._writer is not None:
            t1 = time.perf_counter()
            self._writer.close()
            self.close_s.append(time.perf_counter() - t1)
            self._writer.path.unlink()
            self._writer = None
        return elapsed


def compare(
    work: Workload, device: str, blocks: int, steps_per_block: int, projection: ProjectionConfig = PROJECTION
) -> dict:
    """Alternate timing blocks (ABBA) of the plain and the capturing copy; median ratio."""
    sync = make_sync(device)
    plain = Arm(work.model, work.batches, None)
    capt = Arm(copy.deepcopy(work.model), work.batches, projection)
    for arm in (plain, capt):  # warm-up
        arm.run(2, sync)
    t_plain, t_capt = [], []
    for b in range(blocks):
        order = (plain, capt) if b % 2 == 0 else (capt, plain)
        for arm in order:
            (t_plain if arm is plain else t_capt).append(arm.run(steps_per_block, sync))
    ratios = [c / p for c, p in zip(t_capt, t_plain)]
    med_plain, med_capt = statistics.median(t_plain), statistics.median(t_capt)
    return {
        "workload": work.name,
        **work.description,
        "tracked_layers": capt.tracked,
        "capture_dims": {n: s.dim for n, s in capt.cap.specs.items()},
        "blocks": blocks,
        "steps_per_block": steps_per_block,
        "steps_per_s_without": steps_per_block / med_plain,
        "steps_per_s_with": steps_per_block / med_capt,
        "samples_per_s_without": steps_per_block * len(work.batches[0][0]) / med_plain,
        "samples_per_s_with": steps_per_block * len(work.batches[0][0]) / med_capt,
        "ms_per_step_without": med_plain / steps_per_block * 1e3,
        "ms_per_step_with": med_capt / steps_per_block * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "target_met": statistics.median(ratios) <= TARGET_RATIO,
    }


STORE_VARIANTS = (  # (name, asynchronous, slow disk); None = capture without a store
    ("capture, no store", None, False),
    ("sync, fast disk", False, False),
    ("async, fast disk", True, False),
    ("sync, slow disk", False, True),
    ("async, slow disk", True, True),
)


def store_bytes_per_step(batch: int, dims: dict[str, int]) -> int:
    """Bytes of one step's rows in the store: step, sample_id, weight (8 B each) + float32 layers."""
    return batch * (24 + 4 * sum(dims.values()))


def store_compare(
    work: Workload,
    device: str,
    rounds: int,
    steps: int,
    disk_fraction: float,
    projection: ProjectionConfig = PROJECTION,
    amp: torch.dtype | None = None,
    layers: str | Sequence[str] | None = None,
) -> dict:
    """Step time of a plain copy vs capturing copies that write their rows sync/async to a fast/slow disk.

    The slow disk's bandwidth makes one step's rows take ``disk_fraction`` of a plain step. Each round
    runs ``steps`` steps of every copy (rotating order); ratios are per round, then the median.
    """
    sync = make_sync(device)
    with tempfile.TemporaryDirectory(prefix="dvemb-bench-store-") as tmp:
        plain = Arm(work.model, work.batches, None, amp=amp)
        for _ in range(2):  # warm-up, then the plain step time that sizes the slow disk
            plain.run(steps, sync)
        t_plain = statistics.median(plain.run(steps, sync) for _ in range(3)) / steps
        arms: dict[str, Arm] = {"no capture": plain}
        bandwidth = None
        for name, asynchronous, slow in STORE_VARIANTS:
            model = copy.deepcopy(work.model)
            if asynchronous is None:
                arms[name] = Arm(model, work.batches, projection, amp=amp, layers=layers)
                dims = {n: sp.dim for n, sp in arms[name].cap.specs.items()}
                step_bytes = store_bytes_per_step(len(work.batches[0][0]), dims)
                bandwidth = step_bytes / (disk_fraction * t_plain)
                continue
            store = Store(
                Path(tmp) / name.replace(", ", "-").replace(" ", "-"), asynchronous, bandwidth if slow else None
            )
            arms[name] = Arm(model, work.batches, projection, store=store, amp=amp, layers=layers)
        for arm in arms.values():  # warm-up (allocators, first file)
            arm.run(2, sync)
            arm.write_s.clear()
            arm.close_s.clear()
            if arm.store is not None:
                arm.store.files.clear()
        times: dict[str, list[float]] = {n: [] for n in arms}
        names = list(arms)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(arms[name].run(steps, sync))
    out = []
    for name, arm in arms.items():
        ratios = [t / p for t, p in zip(times[name], times["no capture"])]
        row = {
            "variant": name,
            "ms_per_step": statistics.median(times[name]) / steps * 1e3,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
        if arm.store is not None:
            row |= {
                "write_ms_median": statistics.median(arm.write_s) * 1e3,
                "write_ms_max": max(arm.write_s) * 1e3,
                "close_ms_median": statistics.median(arm.close_s) * 1e3,
                "disk_ms_per_step": arm.store.disk_s / max(1, len(arm.write_s)) * 1e3,
            }
        out.append(row)
    by = {r["variant"]: r for r in out}
    return {
        "workload": work.name,
        **work.description,
        "tracked_layers": arms["capture, no store"].tracked,
        "store_bytes_per_step": step_bytes,
        "plain_ms_per_step_calibration": t_plain * 1e3,
        "disk_fraction": disk_fraction,
        "slow_disk_mb_per_s": bandwidth / 1e6,
        "rounds": rounds,
        "steps_per_round": steps,
        "variants": out,
        # the claim: with the asynchronous writer the slow disk does not show in the step time
        # (ratios to the plain copy of the same round: machine drift cancels)
        "async_slow_over_fast": by["async, slow disk"]["ratio_median"] / by["async, fast disk"]["ratio_median"],
        "sync_slow_over_fast": by["sync, slow disk"]["ratio_median"] / by["sync, fast disk"]["ratio_median"],
    }


def report_store(results: list[dict], console: Console) -> None:
    for r in results:
        t = Table(
            title=f"{r['model']}, B = {r['batch']}: store writes, slow disk = {r['slow_disk_mb_per_s']:.1f} MB/s "
            f"({r['disk_fraction']:.2f} of a plain step per step, {r['store_bytes_per_step'] / 1e3:.0f} kB/step)"
        )
        for col in (
            "variant",
            "ms/step",
            "x no capture",
            "range",
            "write() ms (median / max)",
            "close ms",
            "disk ms/step",
        ):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for v in r["variants"]:
            io = "write_ms_median" in v
            t.add_row(
                v["variant"],
                f"{v['ms_per_step']:.2f}",
                f"{v['ratio_median']:.3f}",
                f"{v['ratio_min']:.2f}-{v['ratio_max']:.2f}",
                f"{v['write_ms_median']:.2f} / {v['write_ms_max']:.2f}" if io else "",
                f"{v['close_ms_median']:.1f}" if io else "",
                f"{v['disk_ms_per_step']:.2f}" if io else "",
            )
        console.print(t)
        console.print(
            f"slow / fast disk step time: async {r['async_slow_over_fast']:.3f}, sync {r['sync_slow_over_fast']:.3f}"
        )


def profile(work: Workload, device: str, steps: int, console: Console) -> None:
    """torch.profiler table of the capturing copy (where the extra time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    arm = Arm(copy.deepcopy(work.model), work.batches, PROJECTION)
    arm.run(2, make_sync(device))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tprofile(activities=acts) as prof:
        arm.run(steps, make_sync(device))
    console.print(f"[bold]profile: {work.name} with capture, {steps} steps[/bold]")
    console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# --------------------------------------------------------------------------- report


def report(results: list[dict], console: Console) -> None:
    t = Table(title=f"Capture overhead (k = 32x32 per layer; target ratio <= {TARGET_RATIO})")
    for col in (
        "workload",
        "B",
        "layers",
        "data",
        "steps/s without",
        "steps/s with",
        "samples/s without",
        "samples/s with",
        "ratio (median)",
        "ratio range",
        "target",
    ):
        t.add_column(col, justify="left" if col in ("workload", "data") else "right")
    for r in results:
        t.add_row(
            r["workload"],
            str(r["batch"]),
            str(r["tracked_layers"]),
            r["data"],
            f"{r['steps_per_s_without']:.2f}",
            f"{r['steps_per_s_with']:.2f}",
            f"{r['samples_per_s_without']:.1f}",
            f"{r['samples_per_s_with']:.1f}",
            f"{r['ratio_median']:.3f}",
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
            "met" if r["target_met"] else "MISSED",
        )
    console.print(t)


def _flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per workload")
    ap.add_argument("--kind", choices=["kronecker", "elementwise"], default="kronecker", help="capture.kind")
    ap.add_argument(
        "--gpt100m",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also a GPT-2-small-sized model (12 x 768, context 512, ~124M parameters); default: on CUDA only",
    )
    ap.add_argument("--disk", action="store_true", help="store writes: sync vs async, fast vs throttled disk")
    ap.add_argument(
        "--disk-fraction", type=float, default=0.5, help="--disk: slow disk time per step / plain step time"
    )


def main_disk(args: argparse.Namespace, console: Console) -> None:
    """``--disk``: does capture wait on the store's disk?"""
    dev = args.device
    # (workload factory, rounds, steps per round)
    plan: list[tuple[Callable[[], Workload], int, int]] = [
        (lambda: mlp_workload(dev), 3 if args.quick else 12, 4 if args.quick else 8),
        (lambda: gpt_workload(dev, vocab=512), 3 if args.quick else 10, 1 if args.quick else 2),
    ]
    results = []
    for factory, rounds, steps in plan:
        work = factory()
        console.log(f"{work.name}: store variants, {rounds} rounds x {steps} steps ...")
        results.append(store_compare(work, dev, rounds, steps, args.disk_fraction))
    report_store(results, console)
    payload = {
        "benchmark": "bench_capture_disk",
        "quick": args.quick,
        "machine": machine_info(dev) | {"load_average_1_5_15min": os.getloadavg()},
        "config": {
            "projection": {"k_a": PROJECTION.k_a, "k_s": PROJECTION.k_s, "dtype": PROJECTION.dtype},
            "store": "SegmentWriter, a fresh file per round and variant (opened/closed outside the timing)",
            "slow_disk": "ThrottledFile: a real file whose writes take bytes / bandwidth seconds",
            "timing": "rounds of every variant in rotating order; ratios to the plain copy per round, median",
        },
        "results": results,
    }
    out = args.out or RESULTS / f"bench_capture_disk{'_quick' if args.quick else ''}_{dev}.json"
    write_json_atomic(out, payload)
    console.log(f"wrote {out}")


def main() -> None:
    args = bench_args(__doc__.split("\n\n")[0], _flags)
    console = Console(width=140)
    if args.disk:
        main_disk(args, console)
        return
    dev = args.device
    projection = dataclasses.replace(PROJECTION, kind=args.kind)
    # (workload factory, timing blocks, steps per block)
    plan: list[tuple[Callable[[], Workload], int, int]] = [
        (lambda: mlp_workload(dev), 4 if args.quick else 12, 5 if args.quick else 20),
        (lambda: gpt_workload(dev, vocab=512), 4 if args.quick else 10, 1 if args.quick else 4),
    ]
    # elementwise projects lm_head's 50257-wide output gradient to k_a * k_s = 1024 rows: ~53 GFLOP a step
    if not args.quick and args.kind == "kronecker":
        plan.append((lambda: gpt_workload(dev, vocab=50257), 6, 2))
    if args.gpt100m or (args.gpt100m is None and dev == "cuda" and not args.quick):
        plan.append((lambda: gpt_workload(dev, 50257, batch=8, n_batches=2, shape=(12, 12, 768, 512)), 6, 3))
    results = []
    for factory, blocks, steps in plan:
        work = factory()
        console.log(f"{work.name}: {blocks} blocks x {steps} steps per arm ...")
        results.append(compare(work, dev, blocks, steps, projection))
        if args.profile:
            profile(work, dev, steps, console)
    report(results, console)
    payload = {
        "benchmark": "bench_capture",
        "quick": args.quick,
        "machine": machine_info(dev),
        "config": {
            "projection": {"k_a": projection.k_a, "k_s": projection.k_s, "dtype": projection.dtype, "kind": args.kind},
            "target_ratio": TARGET_RATIO,
            "timing": "alternating ABBA blocks, median of per-block ratios",
        },
        "results": results,
    }
    name = ("bench_capture_quick" if args.quick else "bench_capture") + (
        "_elementwise" if args.kind == "elementwise" else ""
    )
    out = args.out or RESULTS / f"{name}_{dev}.json"
    write_json_atomic(out, payload)
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()
