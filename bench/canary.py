"""How much client traffic a bad canary gets before the gateway rolls it back, and how long it takes.

One gateway (ServerThread, real HTTP on loopback) per kind of bad, each a manifest with a stable mock
deployment (--stable-ms before the first token) and a challenger at --weight percent (steps
[weight, 100]) with the manifest's default live gates and sample rules (min_requests 100,
min_fail_requests 20, min_seconds 60, decisions every 1 s, a probe round every --probe-every s over a
two-case regression set):

  errors    the challenger fails --error-rate of its requests (the stable answers each of them: it is
            the canary arm's fallback, so the client still gets an answer)
  latency   the challenger takes --slow-ms before its first token
  wrong     the challenger answers every request, but its answers fail a regression case

Traffic is open-loop, --rate requests/s from distinct users (the sticky split puts ~weight% of them
on the canary), until the manifest says rolled_back or --seconds pass. Reported per kind: client
requests sent, requests that reached the challenger before the rollback (the decision's own canary
window), seconds from the first request to the rollback written, probe rounds done by then, and why.
Targets (issue #20): ≤ 200 requests exposed and ≤ 60 s for errors and latency; wrong answers caught
within 2 probe rounds.

Writes bench/results/canary-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

from quantgate.serve.manifest import load_manifest
from quantgate.serve.server import ServerThread
from quantgate.util import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CASES = [{"id": "who", "prompt": "who are you?", "checks": [{"type": "not_contains", "value": "[wrong]"}]},
         {"id": "what", "prompt": "what do you do?", "checks": [{"type": "min_len", "value": 3}]}]


def mock(name: str, delay_ms: float, **more) -> dict:
    return {"name": name, "provider": {"kind": "mock", "delay_ms": delay_ms, "reply_tokens": 8, **more}}


def manifest(a, kind: str) -> dict:
    bad = {"errors": mock("erring", a.stable_ms, error_rate=a.error_rate, seed=1),
           "latency": mock("slow", a.slow_ms),
           "wrong": mock("wrong", a.stable_ms)}[kind]
    return {"schema_version": 2, "active": mock("stable", a.stable_ms),
            "serving": {"default_budget_ms": 5000, "max_budget_ms": 10000, "max_concurrency": 256,
                        "anonymous": True, "cache": {"enabled": False}, "reload_interval_s": 0.2},
            "canary": {"challenger": bad, "steps": [a.weight, 100], "step_started": datetime.now(timezone.utc).isoformat(),
                       "probes": {"cases": CASES, "every_s": a.probe_every}}}


async def traffic(url: str, path: Path, rate: float, seconds: float) -> tuple[int, int, float | None]:
    """Open-loop requests until the rollback; (sent, failed, seconds to the rollback or None)."""
    sent = failed = 0
    t0, w0 = time.perf_counter(), time.time()
    pending: set[asyncio.Task] = set()

    async def one(s, i):
        nonlocal failed
        async with s.post(url + "/chat", json={"user_id": f"user-{i}", "prompt": f"question {i}"}) as r:
            await r.read()
            failed += r.status != 200

    async with aiohttp.ClientSession() as s:
        while time.perf_counter() - t0 < seconds:
            if load_manifest(path).canary.state == "rolled_back":
                break
            due = int((time.perf_counter() - t0) * rate) + 1
            while sent < due:
                t = asyncio.get_running_loop().create_task(one(s, sent))
                pending.add(t)
                t.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.01)  # the pacing of open-loop traffic, not a synchronisation
        await asyncio.gather(*pending, return_exceptions=True)
    done = load_manifest(path).canary
    return sent, failed, done.history[-1].when.timestamp() - w0 if done.state == "rolled_back" else None


def run_kind(a, kind: str, folder: Path) -> dict:
    path = folder / f"manifest-{kind}.json"
    atomic_write_text(path, json.dumps(manifest(a, kind)))
    srv = ServerThread(path).start()
    try:
        sent, failed, seconds = asyncio.run(traffic(srv.url, path, a.rate, a.seconds))
        c = load_manifest(path).canary
        last = c.history[-1] if c.history else None
        fig = (last.figures or {}) if last else {}
        return {"kind": kind, "state": c.state, "client_requests": sent, "failed_client_requests": failed,
                "exposed_requests": (fig.get("canary") or {}).get("requests"),
                "detection_s": round(seconds, 2) if seconds is not None else None,
                "probe_rounds": srv.gateway.canary.rounds, "why": last.why if last else None, "figures": fig}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight", type=float, default=10.0, help="canary percent at its first step")
    ap.add_argument("--rate", type=float, default=25.0, help="client requests per second")
    ap.add_argument("--seconds", type=float, default=120.0, help="give up on a kind after this long")
    ap.add_argument("--stable-ms", type=float, default=20.0)
    ap.add_argument("--slow-ms", type=float, default=200.0)
    ap.add_argument("--error-rate", type=float, default=0.3)
    ap.add_argument("--probe-every", type=float, default=5.0)
    ap.add_argument("--kinds", default="errors,latency,wrong")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds.split(","):
            rows.append(run_kind(a, kind, Path(tmp)))
            r = rows[-1]
            print(f"{kind:8} {r['state']:12} exposed {r['exposed_requests']} of {r['client_requests']} client "
                  f"requests ({r['failed_client_requests']} failed), detected in {r['detection_s']} s, "
                  f"{r['probe_rounds']} probe round(s): {r['why']}", flush=True)
    out = REPO / "bench" / "results" / f"canary-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
                               "args": vars(a), "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
