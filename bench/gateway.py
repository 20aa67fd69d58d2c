"""The gateway's throughput and added latency, side by side with the alternatives, in one run.

Every target answers the same OpenAI-compatible POST /v1/chat/completions with a unique prompt per
request (so the response cache, which is on, never hits), driven by wrk (Debian's `wrk`; a small
asyncio client when wrk is missing) at concurrency 1, 16, 64 and 256:

  direct          the zero-delay OpenAI-compatible stub upstream itself (quantgate.serve.upstream_stub)
  forwarder       a bare async forwarder: aiohttp server + pooled aiohttp client → the stub
  gateway         quantgate's gateway, provider `openai` → the stub, every guard on (API key,
                  tenant/user/global budgets, concurrency gate, cache, degrade ladder, metrics)
  gateway-mock    quantgate's gateway, provider `mock` with zero delay, every guard on
  gateway-hit     the `gateway` target's setup, every request the same prompt: after the first, every
                  answer is a cache hit (the upstream is not called)
  litellm         LiteLLM's proxy (one worker) → the stub, only if /tmp/litellm-venv has it
                  (install it there, never into quantgate's venv:
                   python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]')

Each server runs in its own process, started and stopped here; all on loopback. At each
concurrency the targets are measured in interleaved rounds (--rounds), so a change in the machine's
other load hits them alike. Read the ratios
(gateway/forwarder, gateway/litellm, added P50 against direct), not the absolutes: on a shared
2-core machine the load generator, the upstream and the server under test share the cores. Each
server's CPU per request (its process's user+system time over the requests it answered) is
printed beside: unlike throughput it does not depend on who else wanted the cores.

    .venv/bin/python bench/gateway.py [--duration 6] [--rounds 3] [--concurrency 1,16,64,256] [--targets ...]

Writes bench/results/gateway-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

API_KEY = "qg-bench-key-0123456789"
ADMIN_KEY = "qg-bench-admin-0123456789"  # /metrics needs an admin key once keys are configured
LITELLM_KEY = "sk-bench-0123456789abcdef"
LITELLM_BIN = Path("/tmp/litellm-venv/bin/litellm")
PATH = "/v1/chat/completions"

WRK_SCRIPT = r"""
local counter = 0
local run = tostring(os.time())
local auth = os.getenv("BENCH_AUTH")
local fixed = os.getenv("BENCH_FIXED") == "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end
request = function()
  if not fixed then counter = counter + 1 end
  local body = '{"model":"ok","messages":[{"role":"user","content":"bench ' .. run .. ' ' .. counter ..
               '"}],"max_tokens":16}'
  return wrk.format(nil, nil, nil, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.status, e.connect, e.read, e.write, e.timeout))
end
"""


# ------------------------------------------------------------------ the servers under test
def run_forwarder(port: int, upstream: str) -> None:
    """A bare async forwarder: what any gateway costs at the least (same socket setup as ours)."""
    import aiohttp
    from aiohttp import web

    from quantgate.serve.server import listen_socket

    async def main():
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            async with session.post(upstream + PATH, data=body, headers={"content-type": "application/json"}) as r:
                data = await r.read()
                return web.Response(body=data, status=r.status, content_type="application/json")

        async def health(request):
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post(PATH, forward)
        app.router.add_get("/healthz", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, listen_socket("127.0.0.1", port)).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def gateway_manifest(kind: str, upstream: str) -> dict:
    if kind == "openai":
        provider = {"kind": "openai", "base_url": upstream + "/v1", "model": "ok", "max_connections": 1024}
    else:
        provider = {"kind": "mock", "delay_ms": 0, "reply_tokens": 11}
    big = {"tokens": 10**12, "usd": 10**9, "period_s": 86400}
    return {
        "schema_version": 2,
        "active": {"name": f"bench-{kind}", "model_version": "1", "provider": provider,
                   "price": {"input_per_1m": 0.2, "output_per_1m": 0.6}},
        "serving": {
            "default_budget_ms": 10000, "max_budget_ms": 30000,
            "max_concurrency": 1024, "queue": {"size": 64, "max_wait_ms": 100},
            "cache": {"enabled": True, "ttl_s": 60, "max_entries": 100000},
            "budgets": {"tenants": {"bench": big, "*": big}, "per_user": big, "global": big},
            "api_keys": {"bench": [{"sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]},
            "admin_keys": [{"sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}],
            "ladder": {"enabled": True, "window_s": 30, "min_samples": 50},
            "fallback": {"name": "bench-fallback", "provider": {"kind": "mock", "delay_ms": 0}},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: not ready within {timeout_s} s")


class Target:
    def __init__(self, name: str, argv: list[str], port: int, health: str, auth: str = "", env=None, cwd=None,
                 fixed: bool = False):
        self.name, self.argv, self.port, self.health, self.auth = name, argv, port, health, auth
        self.fixed = fixed  # one prompt for every request (the cache-hit target)
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        self.log = open(Path(tempfile.gettempdir()) / f"bench-gateway-{self.name}.log", "w")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})}, cwd=self.cwd, start_new_session=True)
        wait_http(self.url + self.health, timeout_s, self.proc)

    def cpu_s(self) -> float:
        """The server process's user+system CPU seconds so far (0 when it has none to read)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group: the server and its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# ------------------------------------------------------------------ load
def load_wrk(url: str, conc: int, duration: float, auth: str, fixed: bool = False) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        argv = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", f.name,
                url + PATH]
        out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "BENCH_AUTH": auth,
                                                                       "BENCH_FIXED": "1" if fixed else "0"},
                             timeout=duration + 60)
    finally:
        os.unlink(f.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[7:])
    secs = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {"requests": r["requests"], "secs": secs, "rps": r["requests"] / secs, "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "non2xx": r["non2xx"], "socket_errors": errors}


def load_async(url: str | list[str], conc: int, duration: float, auth: str, tag: str = "",
               fixed: bool = False) -> dict:
    """Fallback load generator when wrk is missing (it is slower: read the ratios only); with a list
    of URLs (replicas, bench/replicas.py) each worker spreads its requests over them in turn."""
    urls = [url] if isinstance(url, str) else url
    import aiohttp

    async def main():
        lat, non2xx, errors = [], 0, 0
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {auth}"} if auth else {})
        end = time.perf_counter() + duration
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def worker(k):
                nonlocal non2xx, errors
                i = 0
                while time.perf_counter() < end:
                    i += 0 if fixed else 1
                    body = json.dumps({"model": "ok", "max_tokens": 16,
                                       "messages": [{"role": "user", "content": f"bench {tag}{k} {i}"}]})
                    t = time.perf_counter()
                    try:
                        async with s.post(urls[(k + i) % len(urls)] + PATH, data=body, headers=headers) as r:
                            await r.read()
                            non2xx += r.status >= 300
                    except aiohttp.ClientError:
                        errors += 1
                    lat.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            await asyncio.gather(*[worker(k) for k in range(conc)])
            secs = time.perf_counter() - t0
        lat.sort()
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0  # noqa: E731
        return {"requests": len(lat), "secs": secs, "rps": len(lat) / secs, "p50_ms": pick(0.5),
                "p99_ms": pick(0.99), "non2xx": non2xx, "socket_errors": errors}

    return asyncio.run(main())


def combine(parts: list[dict]) -> dict:
    """Rounds of one target at one concurrency → one row: throughput over the total time; the
    percentiles are the median of the rounds' (each round's rests on its own requests)."""
    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    secs = sum(p["secs"] for p in parts)
    n = sum(p["requests"] for p in parts)
    cpu = sum(p.get("cpu_s", 0.0) for p in parts)
    return {"requests": n, "secs": secs, "rps": n / secs if secs else 0.0,
            "cpu_us_per_request": cpu / n * 1e6 if n and cpu else None,
            "p50_ms": median([p["p50_ms"] for p in parts]), "p99_ms": median([p["p99_ms"] for p in parts]),
            "non2xx": sum(p["non2xx"] for p in parts), "socket_errors": sum(p["socket_errors"] for p in parts),
            "rounds": len(parts)}


def gateway_counts(url: str) -> dict:
    """What the gateway says happened: 429s, failures (to tell intended rejections from errors) and
    answers from its cache."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {"429": 0.0, "errors": 0.0, "cached": 0.0}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5,
                                                             headers={"x-api-key": ADMIN_KEY}).text):
        for s in fam.samples:
            if s.name == "quantgate_429_total":
                out["429"] += s.value
            elif s.name == "quantgate_requests_total" and s.labels.get("outcome") == "cached":
                out["cached"] += s.value
            elif s.name == "quantgate_requests_total" and s.labels.get("outcome") != "ok":
                out["errors"] += s.value
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of load per target and concurrency")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is cut into")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--targets", default="direct,forwarder,gateway,gateway-hit,gateway-mock,litellm")
    ap.add_argument("--serve-forwarder", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-gateway", nargs=2, metavar=("PORT", "MANIFEST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_forwarder:
        return run_forwarder(int(a.serve_forwarder[0]), a.serve_forwarder[1])
    if a.serve_gateway:
        import logging

        from quantgate.serve.server import serve

        logging.basicConfig(level=logging.ERROR)
        return serve(a.serve_gateway[1], "127.0.0.1", int(a.serve_gateway[0]))

    concs = [int(c) for c in a.concurrency.split(",")]
    wanted = a.targets.split(",")
    load = load_wrk if shutil.which("wrk") else load_async
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    py = sys.executable
    up = Target("upstream", [py, "-m", "quantgate.serve.upstream_stub", "--port", str(free_port())],
                0, "/v1/models")
    up.port = int(up.argv[-1])
    targets: list[Target] = []
    notes: list[str] = []
    for name in wanted:
        port = free_port()
        if name == "direct":
            continue
        if name == "forwarder":
            targets.append(Target(name, [py, __file__, "--serve-forwarder", str(port), up.url], port, "/healthz"))
        elif name in ("gateway", "gateway-mock", "gateway-hit"):
            mpath = work / f"manifest.{name}.json"
            mpath.write_text(json.dumps(gateway_manifest("mock" if name == "gateway-mock" else "openai", up.url)))
            targets.append(Target(name, [py, __file__, "--serve-gateway", str(port), str(mpath)], port, "/healthz",
                                  auth=API_KEY, fixed=name == "gateway-hit"))
        elif name == "litellm":
            if not LITELLM_BIN.exists():
                notes.append("litellm skipped: /tmp/litellm-venv/bin/litellm not found")
                continue
            cfg = work / "litellm.yaml"
            cfg.write_text("model_list:\n  - model_name: ok\n    litellm_params:\n      model: openai/ok\n"
                           f"      api_base: {up.url}/v1\n      api_key: sk-none\n"
                           "litellm_settings:\n  drop_params: true\n")
            targets.append(Target(name, [str(LITELLM_BIN), "--config", str(cfg), "--host", "127.0.0.1", "--port",
                                         str(port), "--num_workers", "1"], port, "/health/liveliness",
                                  auth=LITELLM_KEY, cwd=work,
                                  env={"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                       "LITELLM_LOG": "ERROR"}))
    rows: list[dict] = []
    up.start()
    running: list[tuple[str, Target]] = [("direct", up)] if "direct" in wanted else []
    try:
        for t in targets:
            try:
                t.start(timeout_s=120)
                running.append((t.name, t))
            except RuntimeError as exc:
                notes.append(f"{t.name} skipped: {exc}")
                t.stop()
        # Concurrency outermost, and the run at each concurrency cut into rounds that visit every
        # target in turn: the targets being compared are measured interleaved, so a change in the
        # machine's other load hits them alike (idle servers use ~no CPU).
        slice_s = max(1.0, a.duration / a.rounds)
        for c in concs:
            for _, t in running:
                load(t.url, c, a.warmup, t.auth, fixed=t.fixed)
            parts: dict[str, list[dict]] = {name: [] for name, _ in running}
            for _ in range(a.rounds):
                for name, t in running:
                    cpu0 = t.cpu_s()
                    part = load(t.url, c, slice_s, t.auth, fixed=t.fixed)
                    parts[name].append({**part, "cpu_s": t.cpu_s() - cpu0})
            for name, _ in running:
                r = combine(parts[name])
                rows.append({"target": name, "concurrency": c, **r})
                cpu = f"{r['cpu_us_per_request']:6.0f} us CPU/req" if r["cpu_us_per_request"] else ""
                print(f"{name:13s} c={c:<4d} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:8.2f} ms  "
                      f"p99 {r['p99_ms']:8.2f} ms  non2xx {r['non2xx']}  socket errors {r['socket_errors']}  {cpu}",
                      flush=True)
        for name, t in running:
            if name.startswith("gateway"):
                rows.append({"target": name, "gateway_counts_total": gateway_counts(t.url)})
    finally:
        for t in targets:
            t.stop()
        up.stop()
    report = summarise(rows, concs)
    print_table(rows, report, concs)
    for n in notes:
        print("note:", n)
    meta = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_generator": "wrk -t1" if load is load_wrk else "asyncio client", "duration_s": a.duration,
            "rounds": a.rounds,
            "versions": versions()}
    out = REPO / "bench" / "results" / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from quantgate.util import atomic_write_json

    atomic_write_json(out, {"meta": meta, "rows": rows, "ratios": report, "notes": notes})
    print(f"wrote {out.relative_to(REPO)}")


def summarise(rows: list[dict], concs: list[int]) -> dict:
    by = {(r["target"], r["concurrency"]): r for r in rows if "concurrency" in r}
    out: dict = {}
    for c in concs:
        g, f, ll, d = (by.get((n, c)) for n in ("gateway", "forwarder", "litellm", "direct"))
        gm, gh = by.get(("gateway-mock", c)), by.get(("gateway-hit", c))
        o: dict = {}
        if g and f:
            o["gateway_vs_forwarder_rps"] = g["rps"] / f["rps"]
        if gh and f:
            o["cache_hit_vs_forwarder_rps"] = gh["rps"] / f["rps"]
        if g and ll:
            if ll["rps"] > 0:
                o["gateway_vs_litellm_rps"] = g["rps"] / ll["rps"]
            else:  # LiteLLM can answer nothing at all within a short run at high concurrency
                o["litellm_answered_nothing"] = True
        if d:
            for n, r in (("gateway", g), ("forwarder", f), ("litellm", ll), ("gateway_mock", gm)):
                if r:
                    o[f"{n}_added_p50_ms"] = r["p50_ms"] - d["p50_ms"]
                    o[f"{n}_added_p99_ms"] = r["p99_ms"] - d["p99_ms"]
        out[str(c)] = o
    return out


def print_table(rows: list[dict], report: dict, concs: list[int]) -> None:
    print("\nratios (same run, same machine):")
    print(f"{'conc':>5} {'gw/fwd rps':>11} {'hit/fwd rps':>12} {'gw/litellm rps':>15} {'gw +p50 ms':>11} "
          f"{'fwd +p50 ms':>12} {'litellm +p50':>13} {'mock-gw +p50':>13}")
    for c in concs:
        o = report[str(c)]
        f = lambda k, fmt="{:.2f}": fmt.format(o[k]) if k in o else "-"  # noqa: E731
        print(f"{c:>5} {f('gateway_vs_forwarder_rps'):>11} {f('cache_hit_vs_forwarder_rps'):>12} "
              f"{f('gateway_vs_litellm_rps', '{:.1f}x'):>15} "
              f"{f('gateway_added_p50_ms'):>11} {f('forwarder_added_p50_ms'):>12} {f('litellm_added_p50_ms'):>13} "
              f"{f('gateway_mock_added_p50_ms'):>13}")


def versions() -> dict:
    import importlib.metadata as md

    v = {}
    for pkg in ("aiohttp", "pydantic", "prometheus-client"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if LITELLM_BIN.exists():
        r = subprocess.run([str(LITELLM_BIN.parent / "python"), "-c", "import importlib.metadata as m; "
                            "print(m.version('litellm'))"], capture_output=True, text=True)
        v["litellm"] = r.stdout.strip()
    if shutil.which("wrk"):
        v["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0][:40]
    return v


if __name__ == "__main__":
    main()
