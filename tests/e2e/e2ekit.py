"""Helpers the vLLM e2e tests share: the CLI as a user runs it, HTTP calls to the gateway, waiting on a
condition under a deadline, and whether an engine's process session is still alive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"


def cli(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "quantgate", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return None, {}


def post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json",
                                                                               "x-budget-ms": "20000"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def wait_until(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (got := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.5)  # polling a condition under a deadline
    return got


def serving(url: str, name: str):
    code, body = get_json(f"{url}/readyz")
    eng = (body.get("engines") or {}).get("active") or {}
    return body if code == 200 and body.get("active", "").startswith(name + "@") and eng.get("state") == "ready" else None


def group_alive(leader: int) -> bool:
    """Any live (non-zombie) process left in the engine's session."""
    from quantgate.procs import session_pids

    for pid in session_pids(leader):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except (OSError, IndexError):
            continue
    return False


def start_gateway(manifest: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`quantgate serve MANIFEST` on a free loopback port, its stderr in `log`; (the process, its URL)."""
    from quantgate.procs import free_port

    port = free_port()
    gw = subprocess.Popen([sys.executable, "-m", "quantgate", "serve", str(manifest), "--port", str(port)],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    return gw, f"http://127.0.0.1:{port}"


def stop_gateway(gw: subprocess.Popen, log: Path, groups: set[int]) -> None:
    """SIGTERM: the gateway exits 0 and no process of its engines' sessions outlives it."""
    gw.send_signal(signal.SIGTERM)
    try:
        code = gw.wait(120)
    except subprocess.TimeoutExpired:
        gw.kill()
        code = gw.wait(10)
    assert code == 0, log.read_text()[-3000:]
    assert groups and not [g for g in groups if group_alive(g)], "a vLLM process outlived `quantgate serve`"
