"""The load generator's own limits: how many requests/s it can drive, and how much it adds to TTFT.

A minimal OpenAI-compatible streaming server (raw asyncio protocol, HTTP/1.1 keep-alive, SSE)
runs in a separate process, so it does not share the generator's GIL or event loop. It
stamps, on the machine-wide monotonic clock, when each request reached its handler and when
its first token was written, and hands those stamps back at GET /timings.

  ceiling   fixed concurrency sweeps against a zero-delay endpoint (8 tokens per response):
            requests/s driven, and the CPU share of the generator and of the server, which
            says who the limit is (a process near 100% of one core is); plus an open-loop
            Poisson run at the 1,000 req/s target (achieved rate, send lateness)
  timing    the server waits an injected TTFT (20 ms) before the first token; per request,
            added error = the generator's TTFT - the server's own TTFT (handler entry -> first
            token written), and the generator's TTFT - the nominal injected value
  wrk       if `wrk` is installed: the server's own ceiling with a C client, as a cross-check
            that the server was not the limit in the sweep

Targets: >= 1,000 requests/s driven; added TTFT error < 1 ms at P50.

    .venv/bin/python bench/loadgen.py [--requests 4000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "loadgen.json"


# ============================================================== the bench server (its own process)
class _Proto(asyncio.Protocol):
    """Just enough HTTP/1.1 for keep-alive POSTs with Content-Length and chunked SSE replies."""

    timings: dict[str, list[float]] = {}

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        self.busy = False

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self):
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].decode("latin-1")
        lines = head.split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(self.buf) < head_end + 4 + length:
            return
        body = self.buf[head_end + 4:head_end + 4 + length]
        self.buf = self.buf[head_end + 4 + length:]
        recv = time.perf_counter()
        if method == "GET":
            if path.startswith("/timings"):
                payload = json.dumps(_Proto.timings).encode()
                _Proto.timings = {}
            else:
                payload = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            return self._next()
        req = json.loads(body)
        n = int(req.get("max_tokens", 8))
        ttft, gap = float(req.get("bench_ttft", 0.0)), float(req.get("bench_gap", 0.0))
        rid = headers.get("x-request-id", "").rsplit("-", 1)[-1]  # qg-<run tag>-<request id>
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + _chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'))
        tail = _chunk(b'data: {"choices":[],"usage":{"prompt_tokens":16,"completion_tokens":%d}}\n\ndata: [DONE]\n\n'
                      % n) + b"0\r\n\r\n"
        if ttft <= 0 and gap <= 0:
            self.t.write(_TOKEN * n + tail)
            _Proto.timings[rid] = [recv, time.perf_counter()]
            return self._next()
        self.busy = True
        loop = asyncio.get_running_loop()
        start = loop.time()

        def token(k: int):
            if self.t.is_closing():
                return
            self.t.write(_TOKEN)
            if k == 0:
                _Proto.timings[rid] = [recv, time.perf_counter()]
            if k + 1 < n:
                loop.call_at(start + ttft + (k + 1) * gap, token, k + 1)
            else:
                self.t.write(tail)
                self.busy = False
                self._next()

        loop.call_at(start + ttft, token, 0)


def _chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


_TOKEN = _chunk(b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n')


def serve() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Proto, "127.0.0.1", 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ====================================================================== the bench itself
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs, q):
    from quantgate.evaluate.stats import percentile

    return percentile(xs, q)


async def _fetch_timings(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url + "/timings") as r:
        return json.loads(await r.text())


async def _load(url, spec, prompts, extra=None):
    from quantgate.evaluate.clients.openai_http import OpenAIClient
    from quantgate.evaluate.loadgen import run_load

    async with OpenAIClient(url, "bench", extra_body=extra) as eng:
        return await run_load(eng, spec, prompts)


def ceiling_point(url, server_pid, prompts, *, concurrency, requests, arrival="concurrency", rate=None):
    from quantgate.workload import LengthClass, WorkloadSpec

    spec = WorkloadSpec(requests=requests, concurrency=concurrency, arrival=arrival, rate=rate,
                        warmup_requests=min(200, requests), timeout_s=30,
                        mix=[LengthClass(name="tiny", prompt_tokens=16, output_tokens=8)])
    cpu0, srv0, t0 = time.process_time(), _cpu_s(server_pid), time.perf_counter()
    rep = asyncio.run(_load(url, spec, prompts))
    wall = time.perf_counter() - t0  # includes the warm-up; CPU shares are over the same span
    cpu, srv = time.process_time() - cpu0, _cpu_s(server_pid) - srv0
    a = rep.aggregates
    row = {"arrival": arrival, "concurrency": concurrency, "rate": rate, "requests": a.total, "ok": a.ok,
           "req_per_s": a.request_throughput, "tokens_per_s": a.output_token_throughput,
           "generator_cpu": cpu / wall, "server_cpu": srv / wall,
           "ttft_p50_ms": a.ttft.p50, "e2e_p99_ms": a.e2e.p99}
    if arrival != "concurrency":
        from quantgate.evaluate.loadgen import arrival_offsets

        late = [r.start_s - w for r, w in zip(rep.records, arrival_offsets(spec, len(rep.records)))]
        row["send_late_p50_ms"], row["send_late_p99_ms"] = _pct(late, 50) * 1e3, _pct(late, 99) * 1e3
    asyncio.run(_fetch_timings(url))  # clear the server's stamps
    return row


def timing_point(url, prompts, *, concurrency, requests, ttft=0.020, gap=0.002):
    from quantgate.workload import LengthClass, WorkloadSpec

    spec = WorkloadSpec(requests=requests, concurrency=concurrency, warmup_requests=5, timeout_s=30,
                        mix=[LengthClass(name="tiny", prompt_tokens=16, output_tokens=4)])
    asyncio.run(_fetch_timings(url))
    rep = asyncio.run(_load(url, spec, prompts, extra={"bench_ttft": ttft, "bench_gap": gap}))
    server = asyncio.run(_fetch_timings(url))
    added, vs_nominal, server_ttft = [], [], []
    for r in rep.records:
        if r.outcome == "ok" and r.id in server:
            recv, first = server[r.id]
            server_ttft.append(first - recv)
            added.append(r.ttft_s - (first - recv))
            vs_nominal.append(r.ttft_s - ttft)
    return {"concurrency": concurrency, "n": len(added), "injected_ttft_ms": ttft * 1e3,
            "added_p50_ms": _pct(added, 50) * 1e3, "added_p99_ms": _pct(added, 99) * 1e3,
            "vs_nominal_p50_ms": _pct(vs_nominal, 50) * 1e3, "vs_nominal_p99_ms": _pct(vs_nominal, 99) * 1e3,
            "server_ttft_p50_ms": _pct(server_ttft, 50) * 1e3}


WRK_LUA = """
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello there"}],"max_tokens":8,"stream":true}'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_point(url, connections=64, seconds=5):
    if not shutil.which("wrk"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA)
    try:
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", f.name, url + "/v1/chat/completions"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    return {"connections": connections, "seconds": seconds, "req_per_s": float(m.group(1)) if m else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=4000, help="measured requests per ceiling point")
    ap.add_argument("--quick", action="store_true", help="a smaller run (smoke test of the bench itself)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.serve:
        return serve()

    from quantgate.evaluate.loadgen import PromptSource
    from quantgate.evaluate.prompts import FALLBACK_TEXT
    from quantgate.util import atomic_write_json

    n = 500 if args.quick else args.requests
    prompts = PromptSource(FALLBACK_TEXT)
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "url": url}
        results["wrk"] = wrk_point(url, seconds=2 if args.quick else 5)
        results["ceiling"] = [ceiling_point(url, proc.pid, prompts, concurrency=c, requests=n)
                              for c in ((16, 64) if args.quick else (8, 32, 128, 512))]
        results["open_loop"] = ceiling_point(url, proc.pid, prompts, concurrency=512, requests=n,
                                             arrival="poisson", rate=1000.0)
        results["timing"] = [timing_point(url, prompts, concurrency=c, requests=100 if args.quick else 400)
                             for c in (1, 16)]
    finally:
        proc.terminate()
        proc.wait(10)

    best = max(results["ceiling"], key=lambda r: r["req_per_s"])
    light = results["timing"][0]
    results["summary"] = {
        "driven_req_per_s": best["req_per_s"], "target_req_per_s": 1000.0,
        "added_ttft_p50_ms": light["added_p50_ms"], "added_ttft_p99_ms": light["added_p99_ms"],
        "target_added_ttft_p50_ms": 1.0,
        "meets_targets": best["req_per_s"] >= 1000.0 and light["added_p50_ms"] < 1.0,
    }
    atomic_write_json(Path(args.out), results)
    _print(results)
    print(f"\nwritten to {args.out}")


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=max(100, Console().width))
    t = Table(title="generator ceiling · zero-delay server in its own process · 8 tokens/response · ms")
    for col in ("arrival", "cap", "n", "req/s", "tok/s", "gen CPU", "srv CPU", "TTFT P50", "E2E P99"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in res["ceiling"] + [res["open_loop"]]:
        t.add_row("closed" if r["arrival"] == "concurrency" else f"{r['arrival']} {r['rate']:g}/s",
                  str(r["concurrency"]), str(r["requests"]),
                  f"{r['req_per_s']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['generator_cpu']:.0%}",
                  f"{r['server_cpu']:.0%}", f"{r['ttft_p50_ms']:.2f}", f"{r['e2e_p99_ms']:.2f}")
    c.print(t)
    ol = res["open_loop"]
    c.print(f"open loop at 1000/s: sends late by P50 {ol['send_late_p50_ms']:.2f} ms, "
            f"P99 {ol['send_late_p99_ms']:.2f} ms")
    if res["wrk"]:
        c.print(f"wrk (C client, 64 connections) against the same server: {res['wrk']['req_per_s']:.0f} req/s")
    t = Table(title="TTFT error the generator adds, ms (server injects 20 ms)")
    for col in ("cap", "n", "server TTFT P50", "added P50", "added P99", "vs 20 P50", "vs 20 P99"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in res["timing"]:
        t.add_row(str(r["concurrency"]), str(r["n"]), f"{r['server_ttft_p50_ms']:.3f}", f"{r['added_p50_ms']:.3f}",
                  f"{r['added_p99_ms']:.3f}", f"{r['vs_nominal_p50_ms']:.3f}", f"{r['vs_nominal_p99_ms']:.3f}")
    c.print(t)
    s = res["summary"]
    c.print(f"driven: {s['driven_req_per_s']:.0f} req/s (target ≥ 1000) · "
            f"added TTFT P50 {s['added_ttft_p50_ms']:.3f} ms (target < 1) → "
            + ("targets met" if s["meets_targets"] else "TARGET MISSED"))


if __name__ == "__main__":
    main()
