"""dvemb installs into an environment that already holds torch without touching it (slow: minutes).

Builds the wheel from a copy of the working tree, creates a fresh venv (no system site-packages),
installs torch there first (the 2.13.0 CPU wheel this machine's pip finds locally — any torch >= 2.4
would do), then installs the dvemb wheel with its dependencies, and checks that pip changed no torch
package and that the installed ``dvemb`` command runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
# torch itself and the packages a torch build brings along (CUDA builds pull nvidia-* and triton);
# torch-based libraries (torchmetrics, a lightning dependency) are ordinary dependencies
TORCH_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|nvidia-.+)$", re.I)
NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".cache", "*.parquet", "*.arrow"
)


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def torch_packages(pip: Path) -> dict[str, str]:
    """name -> version of the torch-family packages ``pip freeze`` lists."""
    out = {}
    for line in run(pip, "freeze", "--all").splitlines():
        name, sep, version = line.partition("==")
        if sep and TORCH_PACKAGES.match(name):
            out[name.lower()] = version
    return out


@pytest.mark.slow
def test_wheel_installs_beside_an_existing_torch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)  # the build writes build/ and *.egg-info into the tree
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src)
    (wheel,) = wheels.glob("dvemb-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)  # a fresh environment: no system site-packages
    pip, py = venv / "bin" / "pip", venv / "bin" / "python"
    run(pip, "install", "-q", TORCH)
    before = torch_packages(pip)
    assert before.get("torch", "").startswith("2.13.0"), before

    run(pip, "install", "-q", wheel)
    after = torch_packages(pip)
    assert after == before, f"installing dvemb changed torch packages: {before} -> {after}"
    run(py, "-c", "import dvemb, dvemb.replay.exact, dvemb.capture.callback, torch; print(torch.__version__)")
    assert "run" in run(venv / "bin" / "dvemb", "--help")
