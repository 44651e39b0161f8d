"""GPU measurements at transformer scale in one run: GEMM peak, capture with the asynchronous store,
embedding / direct modes against a same-shape matmul roofline, and exact mode's cost against training.

Sections (each under a wall budget; the JSON is rewritten after each, so a cut-off run keeps the rest):

* ``gemm`` — the measured matmul peak: bf16 and fp32 square products (2·n³ FLOP each).
* ``capture`` — a GPT-2-small-shaped model (HF ``GPT2LMHeadModel`` from ``GPT2Config(n_layer=12,
  n_embd=768, n_head=12)``, random init, context 1024, B = 8, bf16 autocast, SGD) with every Linear and
  HF Conv1D layer captured at 32x32 (the built-in dvemb GPT of the same shape when the installed
  dvemb cannot capture Conv1D; the JSON says which). Copies of the model alternate in rounds:
  no capture; capture without a store; capture writing a gradient store synchronously / asynchronously
  to the real disk and to a throttled one (``bench_capture.ThrottledFile``, 0.5 of a plain step per
  step). Throughput ratio = time without / time with capture (async store, real disk); target >= 0.85.
* ``embed`` — ``embed_steps`` and ``direct_scores`` on GPT-2-shaped records (49 layers of D = k², B = 8
  per step, fp32) resident on the device, and once from host memory as the store returns them; GFLOP/s
  against a roofline of the same two batched matmuls (``bmm`` + in-place ``baddbmm_``) on the same shapes.
* ``exact`` — ``dvemb.replay.exact.exact_scores`` (one reverse sweep with double-backward per step) on the
  GPT-2-shaped model in fp32 with eager attention (twice differentiable), as a ratio to training the same
  steps with the same model; reported as pending when ``dvemb.replay.exact`` cannot be imported here.

Imports: torch, transformers, pyarrow, rich and dvemb modules that need nothing else — no polars,
pydantic or prefect (tests/test_benchmarks_smoke.py runs ``--quick`` with those imports blocked).

Usage::

    benchmarks/gpu.sh                                     # on the GPU machine (< 8 min on an H200)
    python -m benchmarks.bench_gpu --quick --device cpu   # smoke run of every section at toy shapes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from benchmarks.bench_capture import PROJECTION, Workload, store_compare
from benchmarks.common import bench_args, machine_info, make_sync, timed, write_json_atomic
from dvemb.capture.hooks import GradientCapture
from dvemb.embed.direct import direct_scores
from dvemb.embed.segments import embed_steps
from dvemb.errors import CaptureError
from dvemb.models.gpt import GPT, GPTConfig
from dvemb.task import masked_cross_entropy
from dvemb.types import Schedule, StepGrads

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"capture_throughput_ratio": 0.85, "embedding_roofline_ratio": 0.5, "exact_over_training": 5.0}
CAPTURE_LAYERS = ["linear", "hf_conv1d"]  # every Linear and HF Conv1D (the layer registry's kind names)


@dataclass(frozen=True)
class Shapes:
    """Every size of one run (full = GPT-2 small on a GPU; quick = toy shapes for a CPU smoke run)."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    context: int
    batch: int
    rounds: int  # capture: timing rounds of every variant
    steps: int  # capture: steps per round
    gemm_n: int
    embed_sides: tuple[int, ...]  # k of the k x k projection (D = k²)
    embed_layers: int  # layers in the embedding records (GPT-2 small: 48 Conv1D + lm_head)
    embed_max_steps: int
    direct_v: tuple[int, ...]
    exact_context: int
    exact_steps: int
    budgets_s: dict[str, float]  # wall budget per section


FULL = Shapes(
    n_layer=12,
    n_head=12,
    n_embd=768,
    vocab=50257,
    context=1024,
    batch=8,
    rounds=6,
    steps=5,
    gemm_n=8192,
    embed_sides=(32, 64),
    embed_layers=49,
    embed_max_steps=4000,
    direct_v=(1, 16),
    exact_context=512,
    exact_steps=4,
    budgets_s={"gemm": 20, "capture": 150, "embed": 120, "exact": 120},
)
QUICK = Shapes(
    n_layer=2,
    n_head=2,
    n_embd=64,
    vocab=512,
    context=32,
    batch=2,
    rounds=2,
    steps=2,
    gemm_n=256,
    embed_sides=(8,),
    embed_layers=3,
    embed_max_steps=200,
    direct_v=(4,),
    exact_context=16,
    exact_steps=2,
    budgets_s={"gemm": 2, "capture": 30, "embed": 3, "exact": 20},
)


# --------------------------------------------------------------------------- timing


def bench(fn: Callable[[], object], sync: Callable[[], None], min_s: float, warmup: int = 2) -> tuple[float, int]:
    """Median seconds per call of ``fn`` (device synchronised) over >= 3 calls and >= ``min_s`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < 3 or sum(times) < min_s:
        times.append(timed(fn, sync))
    return statistics.median(times), len(times)


# --------------------------------------------------------------------------- gemm peak


def gemm_peak(device: str, n: int, dtype: torch.dtype, min_s: float) -> dict:
    """TFLOP/s of an n x n x n product on random data (3 operand pairs in rotation: no cache reuse)."""
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [
        (
            torch.randn(n, n, generator=gen, device=device, dtype=dtype),
            torch.randn(n, n, generator=gen, device=device, dtype=dtype),
        )
        for _ in range(3)
    ]
    out = torch.empty(n, n, device=device, dtype=dtype)
    calls = [0]

    def one() -> None:
        a, b = pairs[calls[0] % 3]
        torch.mm(a, b, out=out)
        calls[0] += 1

    t, reps = bench(one, make_sync(device), min_s, warmup=3)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "s_per_call": t,
        "tflops": 2 * n**3 / t / 1e12,
        "calls": reps,
    }


# --------------------------------------------------------------------------- capture


class CausalLM(nn.Module):
    """An HF causal LM as ``ids [B, S] -> logits [B, S, V]``."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


def hf_gpt2(sh: Shapes, context: int, attn: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=sh.n_layer,
        n_head=sh.n_head,
        n_embd=sh.n_embd,
        vocab_size=sh.vocab,
        n_positions=max(1024, context),
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attn,
    )
    return CausalLM(GPT2LMHeadModel(cfg))


def capture_model(sh: Shapes, device: str) -> tuple[nn.Module, list[str] | None, str]:
    """(model, capture layer spec, description): HF GPT-2 with Conv1D capture, else the built-in GPT."""
    torch.manual_seed(0)
    try:
        model = hf_gpt2(sh, sh.context)
        cap = GradientCapture(model, PROJECTION, CAPTURE_LAYERS)
        conv = sum(1 for n in cap.specs if ".mlp." in n or ".attn." in n)
        cap.remove()
        if conv == 4 * sh.n_layer:
            return model.to(device), CAPTURE_LAYERS, "HF GPT2LMHeadModel (Linear + Conv1D captured)"
        reason = f"only {conv} of {4 * sh.n_layer} Conv1D layers captured"
    except (CaptureError, TypeError, ValueError) as e:  # a dvemb without the layer registry
        reason = f"{type(e).__name__}: {e}"
    cfg = GPTConfig(vocab_size=sh.vocab, block_size=sh.context, n_layer=sh.n_layer, n_head=sh.n_head, n_embd=sh.n_embd)
    return GPT(cfg).to(device), None, f"built-in dvemb GPT (HF Conv1D capture unavailable: {reason})"


def capture_section(sh: Shapes, device: str, console: Console) -> dict:
    model, layers, desc = capture_model(sh, device)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(2):
        tok = torch.randint(0, sh.vocab, (sh.batch, sh.context + 1), generator=gen)
        batches.append((torch.arange(i * sh.batch, (i + 1) * sh.batch), tok[:, :-1].to(device), tok[:, 1:].to(device)))
    amp = torch.bfloat16 if device == "cuda" else None
    work = Workload(
        f"gpt2_{sh.n_layer}x{sh.n_embd}_ctx{sh.context}",
        model,
        batches,
        {
            "model": f"{desc}, n_layer={sh.n_layer} n_head={sh.n_head} n_embd={sh.n_embd} context={sh.context}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_sample": sh.context,
            "batch": sh.batch,
            "optimizer": "SGD(lr=0.01)",
            "precision": "bf16 autocast" if amp else "fp32",
            "data": "random tokens",
        },
    )
    console.log(f"capture: {desc}; {sh.rounds} rounds x {sh.steps} steps per variant")
    r = store_compare(work, device, sh.rounds, sh.steps, 0.5, PROJECTION, amp=amp, layers=layers)
    by = {v["variant"]: v for v in r["variants"]}
    plain, capt = by["no capture"], by["async, fast disk"]
    r |= {
        "hf_model": layers is not None,
        "samples_per_s_without": sh.batch / plain["ms_per_step"] * 1e3,
        "samples_per_s_with": sh.batch / capt["ms_per_step"] * 1e3,
        "tokens_per_s_with": sh.batch * sh.context / capt["ms_per_step"] * 1e3,
        "throughput_ratio": 1.0 / capt["ratio_median"],
    }
    return r


# --------------------------------------------------------------------------- embedding / direct


def gpt_records(steps: int, n_layers: int, batch: int, dim: int, device: str) -> list[StepGrads]:
    """Random per-sample contributions (|g| ~ 1/B) of ``n_layers`` layers of dim D, w = 1/B (all on ``device``)."""
    gen = torch.Generator(device=device).manual_seed(0)
    names = [f"layer{i:02d}" for i in range(n_layers)]
    return [
        StepGrads(
            t,
            torch.arange(t * batch, (t + 1) * batch),
            torch.full((batch,), 1.0 / batch, dtype=torch.float64, device=device),
            {n: torch.randn(batch, dim, generator=gen, device=device) / (batch * math.sqrt(dim)) for n in names},
        )
        for t in range(steps)
    ]


def roofline(n_layers: int, batch: int, dim: int, cols: int, device: str, min_s: float) -> dict:
    """The two batched matmuls of one step on the same shapes: [L,B,D]x[L,D,N], then M[L,D,N] += [L,D,B]x[L,B,N].

    N = D for embedding mode (M = the propagator), N = V for direct mode (U = the validation vectors).
    """
    gen = torch.Generator(device=device).manual_seed(1)
    m = torch.randn(n_layers, dim, cols, generator=gen, device=device) * 1e-3
    g = torch.randn(n_layers, batch, dim, generator=gen, device=device) * 1e-3
    gt = g.transpose(1, 2).contiguous()
    gn = torch.randn(n_layers, batch, cols, generator=gen, device=device) * 1e-3
    out = torch.empty(n_layers, batch, cols, device=device)
    flops = 4.0 * batch * dim * cols * n_layers
    # enough steps per timed call that the synchronisation around it is noise (~20 ms on an H200)
    n_inner = max(1, int((2e11 if device == "cuda" else 1e8) // flops))

    def steps() -> None:
        for _ in range(n_inner):
            torch.bmm(g, m, out=out)
            m.baddbmm_(gt, gn, alpha=1e-6)

    t, _ = bench(steps, make_sync(device), min_s)
    return {"s_per_step": t / n_inner, "gflops": flops / (t / n_inner) / 1e9}


def embed_shape(sh: Shapes, side: int, device: str, budget_s: float, console: Console) -> dict:
    """Embedding (records on the device and from host memory) and direct modes at D = side², vs rooflines."""
    sync = make_sync(device)
    dim, n_layers, b = side * side, sh.embed_layers, sh.batch
    flops_step = 4.0 * b * dim * dim * n_layers
    sched = Schedule(lr=[0.05] * 100_000, weight_decay=[1e-4] * 100_000)
    probe = gpt_records(4, n_layers, b, dim, device)
    embed_steps(probe, sched, torch.float32, device)  # warm-up (allocator, handles)
    per_step = timed(lambda: embed_steps(probe, sched, torch.float32, device), sync) / len(probe)
    # steps for ~1/12 of the budget per embedding pass; the records take <= 1/4 of the free memory
    steps = max(8, min(sh.embed_max_steps, int(budget_s / 12 / per_step)))
    if device == "cuda":
        steps = max(8, min(steps, int(torch.cuda.mem_get_info()[0] / 4 / (b * dim * n_layers * 4))))
    console.log(f"embed: k = {side}x{side}, {n_layers} layers, B = {b}, {steps} steps")
    recs = gpt_records(steps, n_layers, b, dim, device)
    roof = roofline(n_layers, b, dim, dim, device, budget_s / 12)
    t_emb, _ = bench(lambda: embed_steps(recs, sched, torch.float32, device), sync, budget_s / 6, warmup=1)
    emb = {"s_per_step": t_emb / steps, "gflops": flops_step * steps / t_emb / 1e9}
    emb["roofline_ratio"] = emb["gflops"] / roof["gflops"]
    row = {"k": f"{side}x{side}", "dim": dim, "layers": n_layers, "batch": b, "steps": steps}
    row |= {"roofline": roof, "embedding": emb, "direct": {}}
    if device == "cuda":  # as the pipeline reads them: host (pageable) memory, copied to the device per step
        host = [
            StepGrads(r.step, r.sample_ids, r.weights.cpu(), {n: g.cpu() for n, g in r.grads.items()})
            for r in recs[: max(8, steps // 4)]
        ]
        t_host = timed(lambda: embed_steps(host, sched, torch.float32, device), sync)
        gflops = flops_step * len(host) / t_host / 1e9
        row["embedding_from_host"] = {
            "steps": len(host),
            "s_per_step": t_host / len(host),
            "gflops": gflops,
            "roofline_ratio": gflops / roof["gflops"],
        }
    for v in sh.direct_v:
        gen = torch.Generator(device=device).manual_seed(2)
        val = {n: torch.randn(v, dim, generator=gen, device=device) / side for n in recs[0].grads}
        t_dir, _ = bench(lambda val=val: direct_scores(recs, sched, val, torch.float32, device), sync, budget_s / 12)
        droof = roofline(n_layers, b, dim, v, device, budget_s / 24)
        gflops = 4.0 * b * dim * v * n_layers * steps / t_dir / 1e9
        row["direct"][str(v)] = {
            "s_per_step": t_dir / steps,
            "gflops": gflops,
            "roofline": droof,
            "roofline_ratio": gflops / droof["gflops"],
            "speedup_vs_embedding": emb["s_per_step"] / (t_dir / steps),
        }
    return row


def embed_section(sh: Shapes, device: str, budget_s: float, console: Console) -> list[dict]:
    rows = []
    for side in sh.embed_sides:
        rows.append(embed_shape(sh, side, device, budget_s / len(sh.embed_sides), console))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- exact mode


class _LMTask:
    """The per-sample loss the replay differentiates: token-mean cross-entropy of ``batch["x"] -> batch["y"]``."""

    def per_sample_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return masked_cross_entropy(model(batch["x"]), batch["y"])


def exact_section(sh: Shapes, device: str, console: Console) -> dict:
    """Time ``exact_scores`` over ``exact_steps`` steps vs training the same steps (same model, fp32)."""
    try:
        from dvemb.replay.exact import exact_scores
        from dvemb.replay.optim import OptimizerSpec, StepHyper
        from dvemb.replay.trajectory import LossModel, RecordedStep, Trajectory
    except ImportError as e:
        return {"status": "pending", "reason": f"dvemb.replay.exact is not importable here ({e})"}
    sync = make_sync(device)
    torch.manual_seed(0)
    model = hf_gpt2(sh, sh.exact_context, attn="eager").to(device)  # eager: twice differentiable attention
    b, s, n = sh.batch, sh.exact_context, sh.exact_steps
    gen = torch.Generator().manual_seed(3)

    def batch() -> dict:
        tok = torch.randint(0, sh.vocab, (b, s + 1), generator=gen).to(device)
        return {"sample_id": torch.arange(b), "x": tok[:, :-1], "y": tok[:, 1:]}

    batches = [batch() for _ in range(n)]
    lr = 0.01
    # training the same steps: SGD, mean loss, fp32 (warm-up step first)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    task = _LMTask()

    def train() -> None:
        for bt in batches:
            opt.zero_grad(set_to_none=True)
            task.per_sample_loss(model, bt).mean().backward()
            opt.step()

    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    t_train, _ = bench(train, sync, 0.0, warmup=1)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(params0[k])
    names = tuple(params0)
    w = torch.full((b,), 1.0 / b, device=device)
    traj = Trajectory(
        net=LossModel(task, model),
        spec=OptimizerSpec(kind="sgd", groups=(names,)),
        steps=[
            RecordedStep(torch.arange(i * b, (i + 1) * b), bt, w, StepHyper((lr,), (0.0,)))
            for i, bt in enumerate(batches)
        ],
        epochs=[0] * n,
        checkpoints={0: params0, n: params0},  # verify=False: the end checkpoint only marks the boundary
        opt_states={0: {}, n: {}},
        val=[batch()],
        dtype=torch.float32,
        recorded_dtype=torch.float32,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_exact = timed(lambda: exact_scores(traj, verify=False), sync)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    console.log(f"exact: {n} steps in {t_exact:.2f} s, training {t_train:.2f} s")
    return {
        "status": "measured",
        "model": f"HF GPT2LMHeadModel eager attention, n_layer={sh.n_layer} n_embd={sh.n_embd}, fp32",
        "batch": b,
        "context": s,
        "steps": n,
        "train_s_per_step": t_train / n,
        "exact_s_per_step": t_exact / n,
        "exact_over_training": t_exact / t_train,
        "peak_gib": peak,
        "note": "one sweep: forward replay of the segment + reverse steps (VJP + double backward), verify=False",
    }


# --------------------------------------------------------------------------- report


def summary(payload: dict, console: Console) -> None:
    t = Table(title="GPU summary" if payload["machine"]["device"] == "cuda" else "summary (CPU smoke run)")
    for col in ("quantity", "measured", "target"):
        t.add_column(col, justify="left" if col == "quantity" else "right")
    for g in payload.get("gemm", []):
        t.add_row(f"GEMM peak {g['dtype']} n={g['n']}", f"{g['tflops']:.1f} TFLOP/s", "")
    cap = payload.get("capture")
    if cap:
        t.add_row(
            "capture throughput with / without (async store)",
            f"{cap['throughput_ratio']:.3f} "
            f"({cap['samples_per_s_without']:.1f} -> {cap['samples_per_s_with']:.1f} samples/s)",
            f">= {TARGETS['capture_throughput_ratio']}",
        )
        t.add_row("step time slow / fast disk, async store", f"{cap['async_slow_over_fast']:.3f}", "~1.00")
        t.add_row("step time slow / fast disk, sync store", f"{cap['sync_slow_over_fast']:.3f}", "")
    for r in payload.get("embed", []):
        e = r["embedding"]
        t.add_row(
            f"embedding k={r['k']} x roofline", f"{e['roofline_ratio']:.2f} ({e['gflops']:.0f} GFLOP/s)", ">= 0.5"
        )
        if "embedding_from_host" in r:
            h = r["embedding_from_host"]
            t.add_row(f"embedding k={r['k']} from host memory x roofline", f"{h['roofline_ratio']:.2f}", "")
        for v, d in r["direct"].items():
            t.add_row(
                f"direct V={v} k={r['k']}",
                f"{d['gflops']:.1f} GFLOP/s, {d['roofline_ratio']:.2f} x roofline, "
                f"{d['speedup_vs_embedding']:.1f}x embedding",
                "",
            )
    ex = payload.get("exact")
    if ex:
        val = f"{ex['exact_over_training']:.2f}x training" if ex["status"] == "measured" else ex["status"]
        t.add_row("exact mode cost", val, f"<= {TARGETS['exact_over_training']}x")
    console.print(t)


def _flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--sections", default="gemm,capture,embed,exact", help="comma-separated subset of gemm,capture,embed,exact"
    )


def main() -> None:
    args = bench_args(__doc__.split("\n\n")[0], _flags)
    console = Console(width=140)
    dev = args.device
    sh = QUICK if args.quick else FULL
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    out = args.out or RESULTS / f"bench_gpu{'_quick' if args.quick else ''}_{dev}.json"
    payload: dict = {
        "benchmark": "bench_gpu",
        "quick": args.quick,
        "machine": machine_info(dev),
        "config": {
            "shapes": {k: v for k, v in sh.__dict__.items() if k != "budgets_s"},
            "budgets_s": sh.budgets_s,
            "projection": {"k_a": PROJECTION.k_a, "k_s": PROJECTION.k_s, "dtype": PROJECTION.dtype},
            "targets": TARGETS,
        },
        "wall_s": {},
    }
    t_all = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        budget = sh.budgets_s[name]
        if name == "gemm":
            payload["gemm"] = [gemm_peak(dev, sh.gemm_n, torch.bfloat16, budget / 4)]
            payload["gemm"].append(gemm_peak(dev, sh.gemm_n // 2, torch.float32, budget / 4))
        elif name == "capture":
            payload["capture"] = capture_section(sh, dev, console)
        elif name == "embed":
            payload["embed"] = embed_section(sh, dev, budget, console)
        elif name == "exact":
            payload["exact"] = exact_section(sh, dev, console)
        else:
            raise SystemExit(f"--sections: unknown section {name!r}")
        payload["wall_s"][name] = time.perf_counter() - t0
        console.log(f"{name}: {payload['wall_s'][name]:.1f} s (budget {budget} s)")
        if dev == "cuda":
            torch.cuda.empty_cache()
        write_json_atomic(out, payload)
    payload["wall_s"]["total"] = time.perf_counter() - t_all
    write_json_atomic(out, payload)
    summary(payload, console)
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()
