"""The approximate scoring modes on a language model, against the exact mode, per phase.

The HF GPT-2 example (configs/shakespeare_hf.yaml: GPT-2 architecture from a small config, random init, Shakespeare
speeches as variable-length rows), shrunk so it runs in a minute (``SMALL``): 64 training rows, 1 layer, n_embd 32,
context 24, 2 epochs, fp64. One run per regime, scored in exact mode (one reverse sweep through the recorded
optimizer: the reference) and in direct mode (the embedding modes' numbers, validation-first) by ``dvemb query``.
Reported: Spearman of direct vs exact over all occurrences and over the first / last epoch's. Direct mode is
queried twice: with the run's curvature (the empirical Fisher per layer) and with ``embed.curvature: hessian`` over
the whole model (the exact Hessian in the store's coordinates).

Regimes:

* ``example`` — the example's own training (SGD lr 0.5, warm-up + cosine, global-norm clipping at 1.0) and store
  (16×16 Kronecker over the Conv1D projections and the tied token embedding);
* ``example-adamw`` — the same with AdamW (lr 3e-3; the default rowwise store);
* ``near-linear`` — SGD lr 0.02 without clipping, every Conv1D and LayerNorm captured unprojected: where a
  first-order curvature model should hold.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_lm_modes           # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl
from scipy.stats import spearmanr
from typer.testing import CliRunner

from dvemb.cli import app

try:  # run as a module (python -m benchmarks.bench_lm_modes) or loaded from a path
    from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
except ImportError:  # pragma: no cover
    from common import RESULTS, machine_info, replace_doc_block, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.subset=64", "data.eval_subset=16", "data.block_size=24", "task_options.n_layer=1",
         "task_options.n_embd=32", "embed.segments=2", "train.epochs=2", "train.precision=64-true",
         "capture.dtype=float64", "embed.dtype=float64"]  # fmt: skip
REGIMES = {
    "example": [],
    "example-adamw": ["train.optimizer=adamw", "train.lr=0.003"],
    "near-linear": [
        "train.lr=0.02",
        "train.grad_clip=null",
        "capture.k_a=null",
        "capture.k_s=null",
        "capture.layers=[hf_conv1d,layernorm]",
    ],  # fmt: skip
}
DOC_HEADING = """### The approximate modes on a language model (`bench_lm_modes`)

`OMP_NUM_THREADS=1 python -m benchmarks.bench_lm_modes` (the HF GPT-2 example shrunk; the module docstring says
what each regime is); raw JSON `benchmarks/results/bench_lm_modes_cpu.json`.

"""


def cli(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise RuntimeError(res.output)


def final(path: Path) -> pl.DataFrame:
    df = pl.read_parquet(path)
    return df.filter(pl.col("checkpoint") == df["checkpoint"].max())


QUERIES = {  # direct mode with the default curvature, and with the exact Hessian over the whole model
    "direct": ["score.mode=direct"],
    "hessian": ["score.mode=direct", "embed.curvature=hessian", "embed.blocks=model"],
}


def measure(regime: str, workdir: Path) -> dict:
    run = workdir / regime
    sets = [a for s in SMALL + REGIMES[regime] + ["score.mode=exact"] for a in ("--set", s)]
    cli("run", str(ROOT / "configs" / "shakespeare_hf.yaml"), "--out", str(run), "--engine", "local", *sets)
    out = {"regime": regime}
    for name, query in QUERIES.items():
        cli(
            "query",
            str(run),
            str(run / "data" / "val.parquet"),
            "--name",
            name,
            *(a for q in query for a in ("--set", q)),
        )
        j = final(run / "scores" / "occurrences.parquet").join(
            final(run / "queries" / name / "occurrences.parquet"), on=["sample_id", "step"], suffix="_direct"
        )
        first, last = j["epoch"].min(), j["epoch"].max()

        def rho(df: pl.DataFrame) -> float:
            return float(spearmanr(df["score"], df["score_direct"]).statistic)

        phases = {
            "all": rho(j),
            "first": rho(j.filter(pl.col("epoch") == first)),
            "last": rho(j.filter(pl.col("epoch") == last)),
        }
        out |= {"occurrences": j.height, **(phases if name == "direct" else {name: phases})}
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| regime | occurrences | direct vs exact: Spearman, all | first epoch | last epoch "
        "| with the Hessian (one block): all | first epoch | last epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        h = r.get("hessian")
        hess = " | ".join(f"{h[k]:.3f}" for k in ("all", "first", "last")) if h else "— | — | —"
        lines.append(
            f"| {r['regime']} | {r['occurrences']} | {r['all']:.3f} | {r['first']:.3f} | {r['last']:.3f} | {hess} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="*", default=list(REGIMES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-lm-modes-") as tmp:
        for regime in args.regimes:
            results.append(measure(regime, Path(tmp)))
            print(table(results[-1:]), flush=True)
    write_json_atomic(
        args.out or RESULTS / "bench_lm_modes_cpu.json", {"machine": machine_info("cpu"), "results": results}
    )
    if args.out is None:
        replace_doc_block(ROOT / "docs" / "RESULTS.md", "bench_lm_modes", table(results), missing=DOC_HEADING)
    print(table(results))


if __name__ == "__main__":
    main()
