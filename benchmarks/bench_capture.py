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

Usage::

    python -m benchmarks.bench_capture            # full run (~4 min on a 2-core CPU)
    python -m benchmarks.bench_capture --quick    # smoke run (< 20 s)
    python -m benchmarks.bench_capture --profile  # also print a torch.profiler table per workload
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from benchmarks.common import bench_args, machine_info, make_sync, write_json_atomic
from dvemb.capture.hooks import GradientCapture, loss_weight
from dvemb.models.gpt import GPT, GPTConfig
from dvemb.models.mlp import MLP, MLPConfig
from dvemb.task import masked_cross_entropy
from dvemb.types import ProjectionConfig

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTION = ProjectionConfig(k_a=32, k_s=32)
TARGET_RATIO = 1.3

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sample ids, inputs, targets


# --------------------------------------------------------------------------- helpers


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
    """One model copy + optimizer; with a ``projection`` each step is wrapped in micro_batch/collect."""

    def __init__(self, model: nn.Module, batches: list[Batch], projection: ProjectionConfig | None):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.cap = GradientCapture(model, projection) if projection is not None else None
        self.batches = batches
        self.step_no = 0
        self.tracked = len(self.cap.tracked) if self.cap else 0

    def step(self) -> None:
        ids, x, y = self.batches[self.step_no % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        if self.cap is None:
            masked_cross_entropy(self.model(x), y).mean().backward()
        else:
            with self.cap.micro_batch(ids, weight=loss_weight("mean", len(ids))):
                masked_cross_entropy(self.model(x), y).mean().backward()
            self.cap.collect(self.step_no)  # a real run would hand this StepGrads to the store
        self.opt.step()
        self.step_no += 1

    def run(self, steps: int, sync: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - t0


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


def main() -> None:
    args = bench_args(__doc__.split("\n\n")[0], _flags)
    console = Console(width=140)
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
