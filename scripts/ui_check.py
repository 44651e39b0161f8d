"""Check the Prefect UI end to end and screenshot it: ``python scripts/ui_check.py``.

Starts a real local Prefect server (temporary PREFECT_HOME, a free port), serves the
``pipeline/on-demand`` deployment in a subprocess, triggers one small digits run through
the API, waits for it to finish, then screenshots with headless Chromium:

* docs/img/prefect-custom-run.png     the deployment's Run > Custom run page (the config form)
* docs/img/prefect-flow-run.png       the finished flow run page
* docs/img/prefect-artifacts.png      the flow run's Artifacts tab
* docs/img/prefect-artifact-*.png     the summary, top-samples table and influence plot artifacts

Exits non-zero if any step fails. Needs ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
DEPLOYMENT = "pipeline/on-demand"
SMALL = ["data.source=digits", "train.epochs=2", "embed.segments=3", "name=ui-check"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--virtual-time-budget=20000",
    "--run-all-compositor-stages-before-draw",
    "--window-size=1400,1000",
    "--hide-scrollbars",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class CheckFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ok, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := ok():
                return result
        except CheckFailed:
            raise
        except Exception:
            pass
        time.sleep(every)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def process(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Iterator[subprocess.Popen]:
    """A subprocess with its output in ``log_dir/name.log``; terminated (by its own handle) on exit."""
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    raise CheckFailed("no chromium on PATH: apt-get update && apt-get install -y chromium")


def screenshot(url: str, png: Path, profile: Path) -> Path:
    """Headless Chromium screenshot of ``url`` into ``png``; checks the page is not blank."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    if not png.exists():
        raise CheckFailed(f"chromium wrote no screenshot of {url}")
    shrink(png)
    return png


def screenshot_tab(url: str, tab: str, png: Path, profile: Path, timeout: float = 60) -> Path:
    """Screenshot ``url`` after clicking its tab ``tab``, driving Chromium over the DevTools protocol.

    The Prefect UI ignores ``?tab=...`` on first load, so a real click is needed.
    """
    import base64
    import json

    from websockets.sync.client import connect

    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    flags = [f for f in CHROMIUM_FLAGS if not f.startswith(("--virtual-time-budget", "--run-all-compositor"))]
    cmd = [chromium(), *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        port = wait_until("chromium's DevTools port", lambda: int(port_file.read_text().split()[0]), timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            ws_url = next(t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page")
        with connect(ws_url, max_size=None) as ws:
            ids = iter(range(1, 1_000_000))

            def call(method: str, **params):
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while (msg := json.loads(ws.recv(timeout=timeout))).get("id") != i:
                    pass
                if "error" in msg:
                    raise CheckFailed(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})

            def centre():
                expr = (
                    "(() => { const el = [...document.querySelectorAll('li.p-tab, [role=tab], button')]"
                    f".find(e => e.textContent.trim() === {json.dumps(tab)});"
                    " if (!el) return null; const r = el.getBoundingClientRect();"
                    " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
                )
                return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

            call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            wait_until(f"the {tab!r} tab on {url}", centre, timeout=timeout)
            time.sleep(1.5)  # let the page settle (the tab list re-renders once the run has loaded)
            x, y = centre()
            for kind in ("mousePressed", "mouseReleased"):
                call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
            time.sleep(3)
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()
    shrink(png)
    return png


def shrink(png: Path) -> None:
    """Palette-quantize the screenshot (UI colours survive; the file gets several times smaller)."""
    from PIL import Image, ImageStat

    img = Image.open(png).convert("RGB")
    if max(ImageStat.Stat(img).stddev) < 5:
        raise CheckFailed(f"{png}: the page rendered blank")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def run_check(keep: Path | None) -> list[Path]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from dvemb.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="dvemb-ui-check-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api,
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    serve_cmd = [sys.executable, str(ROOT / "deployments" / "serve.py"), "--only", "on-demand", "--runs", str(tmp)]
    shots: list[Path] = []
    try:
        with process("server", server_cmd, env, tmp) as server:
            print(f"[ui-check] prefect server on {api} (PREFECT_HOME={tmp / 'prefect'})", flush=True)

            def healthy() -> bool:
                if server.poll() is not None:
                    raise CheckFailed(f"prefect server exited:\n{tail(tmp / 'server.log')}")
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    return r.status == 200

            try:
                wait_until("the Prefect server", healthy, timeout=90)
            except CheckFailed:
                raise CheckFailed(f"server not healthy:\n{tail(tmp / 'server.log')}") from None
            with process("serve", serve_cmd, env, tmp) as serve, get_client(sync_client=True) as client:

                def deployed():
                    if serve.poll() is not None:
                        raise CheckFailed(f"serve exited:\n{tail(tmp / 'serve.log')}")
                    return client.read_deployment_by_name(DEPLOYMENT)

                try:
                    deployment = wait_until(DEPLOYMENT, deployed, timeout=90)
                except CheckFailed as e:
                    raise CheckFailed(f"{e}\n{tail(tmp / 'serve.log')}") from None
                print(f"[ui-check] deployment {DEPLOYMENT} id={deployment.id}", flush=True)
                params = {"config": load_config(None, SMALL).model_dump(mode="json"), "out": str(tmp / "ui-check-run")}
                flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=params, name="ui-check")
                print(f"[ui-check] triggered flow run {flow_run.id}; waiting", flush=True)

                def finished():
                    fr = client.read_flow_run(flow_run.id)
                    return fr if fr.state and fr.state.is_final() else None

                fr = wait_until("the flow run to finish", finished, timeout=300, every=1)
                if not fr.state.is_completed():
                    raise CheckFailed(f"flow run ended {fr.state.name}: {fr.state.message}\n{tail(tmp / 'serve.log')}")
                run_dir = tmp / "ui-check-run"
                if not (run_dir / "curation" / "curated.parquet").exists():
                    raise CheckFailed(f"{run_dir}: no curated table after a completed run")
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
                )
                by_key = {a.key: a for a in artifacts}
                print(f"[ui-check] completed; artifacts: {sorted(by_key)}", flush=True)
                if len(by_key) < 3:
                    raise CheckFailed(f"expected 3 artifacts, got {sorted(by_key)}")

                ui = f"http://127.0.0.1:{port}"
                profile = tmp / "chromium-profile"
                pages = {
                    "prefect-custom-run.png": f"{ui}/deployments/deployment/{deployment.id}/run",
                    "prefect-flow-run.png": f"{ui}/runs/flow-run/{flow_run.id}",
                    "prefect-artifact-summary.png": f"{ui}/artifacts/artifact/{by_key['dvemb-run-summary'].id}",
                    "prefect-artifact-top-samples.png": f"{ui}/artifacts/artifact/{by_key['dvemb-top-samples'].id}",
                    "prefect-artifact-influence.png": f"{ui}/artifacts/artifact/{by_key['dvemb-influence-by-step'].id}",
                }
                for name, url in pages.items():
                    shots.append(screenshot(url, IMG / name, profile))
                    print(f"[ui-check] {url} -> {shots[-1].relative_to(ROOT)}", flush=True)
                url = f"{ui}/runs/flow-run/{flow_run.id}"
                shots.append(screenshot_tab(url, "Artifacts", IMG / "prefect-artifacts.png", tmp / "chromium-cdp"))
                print(f"[ui-check] {url} (Artifacts tab) -> {shots[-1].relative_to(ROOT)}", flush=True)
    finally:
        if keep is not None:
            print(f"[ui-check] kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, PREFECT_HOME, run)")
    args = ap.parse_args(argv)
    try:
        run_check(Path() if args.keep else None)
    except (CheckFailed, subprocess.SubprocessError) as e:
        print(f"[ui-check] FAILED: {e}", file=sys.stderr)
        return 1
    print("[ui-check] OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
