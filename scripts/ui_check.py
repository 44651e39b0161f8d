"""Check the Prefect UI end to end and screenshot it: ``python scripts/ui_check.py [--keep]``.

Works from a clean machine: it makes its own PREFECT_HOME in a temporary folder and sets every Prefect
setting (home, API URL, UI API URL, server port) BEFORE anything imports Prefect, so it only ever talks
to the server it starts. Then it:

1. starts ``prefect server start`` on a free port;
2. serves prefect.yaml's deployments (``deployments/serve.py``) in a subprocess;
3. triggers ``pipeline/on-demand`` through the API with a config file and overrides (a small digits run,
   published into a temporary datasets folder), under a unique flow-run name, and waits for it; the
   publication starts ``retrain/retrain-curated`` through its trigger; it waits for that too;
4. drives headless Chromium over the DevTools protocol and, for every page, waits until the page's text
   shows what it must (the flow-run name, the parameter names, the artifact's content) — a blank or
   foreign page fails — then screenshots it into docs/img/:

* prefect-custom-run.png            the on-demand deployment's Run > Custom run form
* prefect-flow-run.png              the finished flow run (run graph)
* prefect-flow-run-logs.png         its Logs tab (dvemb's stage lines)
* prefect-artifacts.png             its Artifacts tab
* prefect-artifact-summary.png      the run summary (config, kept/dropped and why)
* prefect-artifact-top-samples.png  the top-samples table
* prefect-artifact-influence.png    the influence-by-step plot
* prefect-artifact-retrain.png      the retraining comparison (curated vs full vs random)

Exits non-zero if any step fails. Needs ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
ON_DEMAND = "pipeline/on-demand"
RETRAIN = "retrain/retrain-curated"
SMALL = ["train.epochs=2", "data.subset=300", "embed.segments=2"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
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


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """Every Prefect setting the check depends on: its own home, its own server (API, UI, port)."""
    api = f"http://127.0.0.1:{port}/api"
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }


def wait_until(what: str, ok: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
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
def process(name: str, cmd: list[str], log_dir: Path) -> Iterator[subprocess.Popen]:
    """A subprocess with its output in ``log_dir/name.log``; terminated (by its own handle) on exit."""
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` by its own handle if it still runs (killed after 20 s); tests/flows use it too."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    raise CheckFailed("no chromium on PATH: apt-get update && apt-get install -y chromium")


class Browser:
    """Headless Chromium over the DevTools protocol: open a page, wait for text, click a tab, screenshot."""

    def __init__(self, profile: Path, timeout: float = 90):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.timeout = timeout
        port_file = profile / "DevToolsActivePort"
        port = wait_until("chromium's DevTools port", lambda: int(port_file.read_text().split()[0]), timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            ws_url = next(t["webSocketDebuggerUrl"] for t in json.load(r) if t["type"] == "page")
        self.ws = connect(ws_url, max_size=None)
        self.ids = iter(range(1, 1_000_000))
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while (msg := json.loads(self.ws.recv(timeout=self.timeout))).get("id") != i:
            pass
        if "error" in msg:
            raise CheckFailed(f"DevTools {method}: {msg['error']}")
        return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, *must_show: str) -> None:
        """Navigate and wait until the page's text holds every string of ``must_show`` (else CheckFailed)."""
        self.call("Page.navigate", url="about:blank")  # nothing of the previous page can pass the check
        wait_until("a blank page", lambda: self.eval("location.href") == "about:blank", self.timeout)
        self.call("Page.navigate", url=url)
        self.wait_text(url, *must_show)

    def wait_text(self, where: str, *must_show: str) -> None:
        try:
            wait_until(f"{must_show} on {where}", lambda: all(s in self.text() for s in must_show), self.timeout)
        except CheckFailed:
            shown = " ".join(self.text().split())[:600]
            raise CheckFailed(f"{where}: the page never showed {must_show}; it shows: {shown!r}") from None
        time.sleep(1.5)  # let charts and late requests settle before the screenshot

    def click_tab(self, tab: str, *must_show: str) -> None:
        """Click the tab labelled ``tab`` (the UI ignores ``?tab=`` on first load), wait for its content."""
        expr = (
            "(() => { const el = [...document.querySelectorAll('li.p-tab, [role=tab], button')]"
            f".find(e => e.textContent.trim() === {json.dumps(tab)});"
            " if (!el) return null; const r = el.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = wait_until(f"the {tab!r} tab", lambda: self.eval(expr), self.timeout)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        self.wait_text(f"the {tab!r} tab", *must_show)

    def scroll_to(self, text: str) -> None:
        """Scroll the innermost element whose text holds ``text`` to the top of the view."""
        self.eval(
            "(() => { const all = [...document.querySelectorAll('body *')]"
            f".filter(e => e.children.length === 0 && e.textContent.includes({json.dumps(text)}));"
            " if (all.length) all[0].scrollIntoView({block: 'start'}); })()"
        )
        time.sleep(1)

    def screenshot(self, png: Path) -> Path:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        shrink(png)
        return png

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def shrink(png: Path) -> None:
    """Refuse a blank screenshot; palette-quantize it (UI colours survive; the file gets smaller)."""
    from PIL import Image, ImageStat

    img = Image.open(png).convert("RGB")
    if max(ImageStat.Stat(img).stddev) < 5:
        raise CheckFailed(f"{png}: the page rendered blank")
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def run_check(tmp: Path, port: int) -> list[Path]:
    """Everything after the settings are in place (Prefect is imported here, never before)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
    )

    api = os.environ["PREFECT_API_URL"]
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    serve_cmd = [
        sys.executable,
        str(ROOT / "deployments" / "serve.py"),
        *("--runs", str(tmp / "runs"), "--datasets", str(tmp / "datasets")),
    ]
    shots: list[Path] = []
    with process("server", server_cmd, tmp) as server:
        print(f"[ui-check] prefect server on {api} (PREFECT_HOME={os.environ['PREFECT_HOME']})", flush=True)

        def healthy() -> bool:
            if server.poll() is not None:
                raise CheckFailed(f"prefect server exited:\n{tail(tmp / 'server.log')}")
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200

        try:
            wait_until("the Prefect server", healthy, timeout=120)
        except CheckFailed:
            raise CheckFailed(f"server not healthy:\n{tail(tmp / 'server.log')}") from None
        with process("serve", serve_cmd, tmp) as serve, get_client(sync_client=True) as client:

            def deployed(name: str) -> Callable[[], Any]:
                def ok() -> Any:
                    if serve.poll() is not None:
                        raise CheckFailed(f"serve exited:\n{tail(tmp / 'serve.log')}")
                    return client.read_deployment_by_name(name)

                return ok

            on_demand = wait_until(ON_DEMAND, deployed(ON_DEMAND), timeout=120)
            retrain = wait_until(RETRAIN, deployed(RETRAIN), timeout=60)
            name = f"ui-check-{uuid.uuid4().hex[:8]}"
            params = {
                "config": "configs/digits_mlp.yaml",
                "overrides": SMALL,
                "out": str(tmp / "runs" / name),
                "publish_to": str(tmp / "datasets"),
            }
            flow_run = client.create_flow_run_from_deployment(on_demand.id, parameters=params, name=name)
            print(f"[ui-check] triggered {ON_DEMAND} as {name!r} ({flow_run.id}); waiting", flush=True)

            def finished(flow_run_id: Any) -> Callable[[], Any]:
                def ok() -> Any:
                    if serve.poll() is not None:
                        raise CheckFailed(f"serve exited:\n{tail(tmp / 'serve.log')}")
                    fr = client.read_flow_run(flow_run_id)
                    return fr if fr.state and fr.state.is_final() else None

                return ok

            fr = wait_until("the flow run to finish", finished(flow_run.id), timeout=400, every=1)
            if not fr.state.is_completed():
                raise CheckFailed(f"flow run ended {fr.state.name}: {fr.state.message}\n{tail(tmp / 'serve.log')}")
            versions = sorted((tmp / "datasets").glob("*/v*/manifest.json"))
            if len(versions) != 1:
                raise CheckFailed(f"expected one published dataset version, found {versions}")

            def triggered() -> Any:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id]))
                )
                return runs[0] if runs else None

            retrain_run = wait_until("the trigger to start the retraining", triggered, timeout=90, every=1)
            retrain_run = wait_until("the retraining to finish", finished(retrain_run.id), timeout=400, every=1)
            if not retrain_run.state.is_completed():
                raise CheckFailed(f"retraining ended {retrain_run.state.name}: {retrain_run.state.message}")

            def artifacts(flow_run_id: Any) -> dict:
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
                )
                return {a.key: a for a in found}

            arts, retrain_arts = artifacts(flow_run.id), artifacts(retrain_run.id)
            print(f"[ui-check] completed; artifacts: {sorted(arts)} + {sorted(retrain_arts)}", flush=True)
            for key in ("dvemb-run-summary", "dvemb-top-samples", "dvemb-influence-by-step"):
                if key not in arts:
                    raise CheckFailed(f"artifact {key} missing; got {sorted(arts)}")
            if "dvemb-retrain-comparison" not in retrain_arts:
                raise CheckFailed(f"retraining artifact missing; got {sorted(retrain_arts)}")

            ui = f"http://127.0.0.1:{port}"
            run_url = f"{ui}/runs/flow-run/{flow_run.id}"
            browser = Browser(tmp / "chromium")
            try:
                browser.open(f"{ui}/deployments/deployment/{on_demand.id}/run", "overrides", "publish_to", "force")
                shots.append(browser.screenshot(IMG / "prefect-custom-run.png"))
                browser.open(run_url, name, "Completed")
                shots.append(browser.screenshot(IMG / "prefect-flow-run.png"))
                browser.click_tab("Logs", "curate: kept", "train: ")
                browser.scroll_to("(scheduled ")  # the line above the stage lines (the config is long)
                shots.append(browser.screenshot(IMG / "prefect-flow-run-logs.png"))
                browser.open(run_url, name, "Completed")
                browser.click_tab("Artifacts", "dvemb-run-summary")
                shots.append(browser.screenshot(IMG / "prefect-artifacts.png"))
                pages = {
                    "prefect-artifact-summary.png": (arts["dvemb-run-summary"], "Curation: kept and dropped"),
                    "prefect-artifact-top-samples.png": (arts["dvemb-top-samples"], "most harmful"),
                    "prefect-artifact-influence.png": (arts["dvemb-influence-by-step"], "Influence over training"),
                    "prefect-artifact-retrain.png": (retrain_arts["dvemb-retrain-comparison"], "random"),
                }
                for png, (artifact, text) in pages.items():
                    browser.open(f"{ui}/artifacts/artifact/{artifact.id}", text)
                    shots.append(browser.screenshot(IMG / png))
            finally:
                browser.close()
            for shot in shots:
                print(f"[ui-check] {shot.relative_to(ROOT)}", flush=True)
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, PREFECT_HOME, runs)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dvemb-ui-check-"))
    port = free_port()
    os.environ.update(prefect_env(tmp / "prefect", port))  # before Prefect is imported (it reads them once)
    if "prefect" in sys.modules:
        print("[ui-check] FAILED: Prefect was imported before its settings were set", file=sys.stderr)
        return 1
    try:
        run_check(tmp, port)
    except (CheckFailed, subprocess.SubprocessError) as e:
        print(f"[ui-check] FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"[ui-check] kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("[ui-check] OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
