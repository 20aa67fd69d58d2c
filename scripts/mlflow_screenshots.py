"""Screenshots of the MLflow UI on a real run's embedded store: what a reviewer sees.

Starts `mlflow ui` on loopback over WORKSPACE/mlflow.db, then headless Chromium (Debian package
`chromium`) captures: the experiment's runs, the comparison of the candidates, one child run,
and the parent run's artifacts. PNGs go to bench/results/mlflow/ (ignored by git).

    .venv/bin/python scripts/mlflow_screenshots.py WORKSPACE/runs/NAME-HASH [--out bench/results/mlflow]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                sys.exit(f"mlflow ui did not start on {url}")
            time.sleep(0.5)


def shoot(browser: str, url: str, out: Path, wait_ms: int) -> None:
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1000", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out}  ←  {url}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a logged run folder (WORKSPACE/runs/NAME-HASH, with tracking.json)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mlflow"))
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    tracking = json.loads((run_dir / "tracking.json").read_text())
    ws = run_dir.parents[1]
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{ws / 'mlflow.db'}",
         "--default-artifact-root", (ws / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, proc)
        exp, parent = tracking["experiment_id"], tracking["parent_run_id"]
        children = tracking["child_run_ids"]
        child = children.get(next((c for c in children if c.startswith("gptq")), next(iter(children))))
        pages = {
            "1-experiment-runs.png": f"{base}/#/experiments/{exp}/runs",
            "2-compare-candidates.png": f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(list(children.values())))}"
                                        f"&experiments={urllib.parse.quote(json.dumps([exp]))}",
            "3-child-run.png": f"{base}/#/experiments/{exp}/runs/{child}",
            "4-parent-overview.png": f"{base}/#/experiments/{exp}/runs/{parent}",
            "5-parent-artifacts.png": f"{base}/#/experiments/{exp}/runs/{parent}/artifacts",
        }
        for name, url in pages.items():
            shoot(browser, url, out / name, args.wait_ms)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
