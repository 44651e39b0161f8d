"""Shared helpers of the benchmark scripts: machine facts, device sync, timing, JSON output."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dvemb.store.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


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
