"""scripts/ui_check.py: a blank or foreign page fails it; the full check (real server, serve, trigger,
screenshots) passes. The browser tests are slow and need chromium; not in CI."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SHOTS = (
    "prefect-custom-run.png",
    "prefect-flow-run.png",
    "prefect-flow-run-logs.png",
    "prefect-artifacts.png",
    "prefect-artifact-summary.png",
    "prefect-artifact-top-samples.png",
    "prefect-artifact-influence.png",
    "prefect-artifact-retrain.png",
)
needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="needs chromium"
)


def ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", ROOT / "scripts" / "ui_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_blank_screenshot_fails(tmp_path: Path) -> None:
    mod = ui_check()
    png = tmp_path / "blank.png"
    Image.new("RGB", (200, 100), (24, 24, 27)).save(png)
    with pytest.raises(mod.CheckFailed, match="blank"):
        mod.shrink(png)


@pytest.mark.slow
@needs_chromium
def test_a_page_without_the_expected_text_fails(tmp_path: Path) -> None:
    """The real check: a page that does not show the flow-run name fails, however it looks."""
    mod = ui_check()
    page = tmp_path / "page.html"
    page.write_text("<html><body><h1>Prefect</h1><p>another run: happy-otter</p></body></html>")
    browser = mod.Browser(tmp_path / "profile", timeout=10)
    try:
        browser.open(page.as_uri(), "happy-otter")  # shown: passes
        with pytest.raises(mod.CheckFailed, match="ui-check-1234"):
            browser.open(page.as_uri(), "ui-check-1234")
    finally:
        browser.close()


@pytest.mark.slow
@needs_chromium
def test_ui_check_script_passes() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ui_check.py")], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in SHOTS:
        assert (ROOT / "docs" / "img" / name).stat().st_size > 10_000, name
