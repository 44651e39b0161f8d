"""The real-server UI check (scripts/ui_check.py): serve, trigger, wait, screenshot. Slow; not in CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="needs chromium")
def test_ui_check_script_passes() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ui_check.py")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("prefect-custom-run.png", "prefect-flow-run.png", "prefect-artifacts.png"):
        assert (ROOT / "docs" / "img" / name).stat().st_size > 10_000
