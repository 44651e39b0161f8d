"""Fixtures shared by the test modules.

Imports of dvemb's CLI stay inside the fixtures: benchmarks/gpu.sh runs tests/test_gradstore_async.py on a
machine without polars, pydantic or Prefect, and this file is loaded there too."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cli_run() -> Callable[..., Path]:
    """``cli_run(out, sets)``: ``dvemb run configs/digits_mlp.yaml --out OUT --engine local --set ...`` through the
    CLI (exit 0 asserted, with its output); returns OUT."""

    from typer.testing import CliRunner

    from dvemb.cli import app

    def run(out: Path, sets: list[str], config: str = "digits_mlp.yaml") -> Path:
        args = ["run", ROOT / "configs" / config, "--out", out, "--engine", "local"]
        res = CliRunner().invoke(app, [str(a) for a in args] + [a for s in sets for a in ("--set", s)])
        assert res.exit_code == 0, res.output
        return out

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(request, tmp_path_factory) -> Iterator:
    """A real S3-compatible server for the module: ``moto_server`` on a free port (its own credentials and
    region), ``AWS_ENDPOINT_URL`` pointing at it (set before anything starts that should inherit it), the
    module's ``BUCKET`` created; yields a pyarrow S3 filesystem on it (the tests' independent view)."""
    import pyarrow.fs as pafs

    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
                mp.setenv(k, v)
            bucket = request.module.BUCKET
            fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")
            fs.create_dir(bucket)
            yield fs
    finally:
        proc.terminate()
        proc.wait(timeout=20)
