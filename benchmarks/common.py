"""Shared helpers of the benchmark scripts: machine facts, device sync, timing, JSON output, and dvemb runs
(recorded by dvemb's own training, scored by its own stages) read back as occurrence tables."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dvemb.store.atomic import atomic_path, write_json

if TYPE_CHECKING:  # the run helpers below import the pipeline (polars, Lightning) when called: bench_gpu needs neither
    import polars as pl

    from dvemb.config import RunConfig
    from dvemb.store.rundir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
FP64 = ["train.precision=64-true", "capture.dtype=float64", "embed.dtype=float64"]  # a run replayable to 1e-10


def machine_info(device: str) -> dict:
    """CPU model, cores, torch version, device name and date of this run."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": device,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (never a partial file)."""
    write_json(path, payload)


def make_sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Wall-clock seconds of one call of ``fn`` (device synchronised before and after)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common flags (--device, --quick, --threads, --out); sets the torch thread count."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run (< 20 s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    if extra:
        extra(ap)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def replace_doc_block(path: Path, name: str, body: str, missing: str | None = None) -> None:
    """Rewrite the ``<!-- name:begin -->…<!-- name:end -->`` block of a doc atomically.

    missing: text put before the block when the doc has none yet (e.g. a section heading);
    None = the markers must already be there.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    elif missing is None:
        raise SystemExit(f"{path}: no {begin} / {end} markers")
    else:
        text = text.rstrip("\n") + "\n\n" + missing + block + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def source_run_path(run_dir: Path | None, prefix: str) -> Iterator[Path]:
    """``run_dir`` as given, or ``<a temp dir>/run``, removed on exit (also when the benchmark fails)."""
    if run_dir is not None:
        yield run_dir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "run"


def record(overrides: list[str], run: RunDir, config: str = "digits_mlp.yaml") -> tuple[RunConfig, float]:
    """Train ``configs/<config>`` with ``overrides`` into ``run`` through dvemb's training (Lightning, capture
    callback, run directory); returns the config and the wall time of the train stage in seconds."""
    from dvemb.config import load_config
    from dvemb.train.run import train

    cfg = load_config(ROOT / "configs" / config, overrides)
    t0 = time.perf_counter()
    train(cfg, run, force=True, progress=False)
    return cfg, time.perf_counter() - t0


def final_scores(run: RunDir) -> pl.DataFrame:
    """(step, sample_id, score) of every occurrence at the final checkpoint, as the score stage wrote them."""
    import polars as pl

    occ = pl.read_parquet(run.occurrences)
    return occ.filter(pl.col("checkpoint") == occ["checkpoint"].max()).select("step", "sample_id", "score")


def stage_scores(
    run: RunDir, mode: str = "direct", curvature: str = "empirical", blocks: str = "layer"
) -> tuple[pl.DataFrame, dict[str, float]]:
    """dvemb's embed (embedding mode only) and score stages on ``run`` with that scoring setup, at the final
    checkpoint: (step, sample_id, score) and the seconds of each stage."""
    from dvemb.embed.run import embed_segment
    from dvemb.runtask import run_config
    from dvemb.score.run import score

    cfg = run_config(run)
    embed = cfg.embed.model_copy(update={"curvature": curvature, "blocks": blocks})
    cfg = cfg.model_copy(
        update={"embed": embed, "score": cfg.score.model_copy(update={"mode": mode, "checkpoints": False})}
    )
    t0 = time.perf_counter()
    if mode == "embedding":
        for j in range(len(run.boundaries) - 1):
            embed_segment(run, j, embed, mode)
    t1 = time.perf_counter()
    score(run, cfg)
    return final_scores(run), {"embed": t1 - t0, "score": time.perf_counter() - t1}


def occurrence_order(steps: list[torch.Tensor]) -> pl.DataFrame:
    """(step, sample_id) of every occurrence in the recorded order (steps[t]: step t's sample ids [B_t])."""
    import polars as pl

    return pl.DataFrame(
        {
            "step": torch.cat([torch.full((len(s),), t) for t, s in enumerate(steps)]).numpy(),
            "sample_id": torch.cat(steps).numpy(),
        },
        schema={"step": pl.Int64, "sample_id": pl.Int64},
    )


def in_order(scores: pl.DataFrame, order: pl.DataFrame) -> torch.Tensor:
    """The ``score`` column of (step, sample_id, score) as a tensor in ``order``'s row order (float64)."""
    got = order.join(scores, on=["step", "sample_id"], how="left", maintain_order="left")["score"]
    if got.null_count():
        raise ValueError(f"{got.null_count()} occurrences have no score")
    return torch.from_numpy(got.to_numpy().copy()).to(torch.float64)
