"""Does one abusive tenant hurt the others? Well-behaved tenants' P99 and success rate, with and
without an abusive client, measured side by side in one run.

  10 well-behaved tenants   each sends non-streaming requests at a steady rate (open loop)
  1 abusive tenant          in its own process: floods at 10× its request share, holds streams open
                            while reading them slowly, cuts streams mid-answer (the cut-stream
                            evader), keeps half-sent-header connections open, sends CJK floods
                            (32,760 wide characters) and empty-message floods (31,000 messages,
                            1 MB), asks for long answers (max_tokens 900: the ladder must not
                            degrade the others), and fills sockets that never send a byte from
                            other loopback addresses (127.0.0.2-6: the idle-socket filler)

The gateway (`quantgate serve`, its own process, loopback) serves a mock deployment with per-tenant
limits (concurrency share, request rate) and API keys. Rounds alternate "quiet" (no abuser) and
"abuse" so drift on a shared machine hits both alike; a fresh gateway serves each round. Read the
ratios: abuse/quiet P99 and the success rates (the target: within 10%).

    .venv/bin/python bench/abuse.py [--duration 15] [--rounds 2] [--rate 5]

Writes bench/results/abuse-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOOD = [f"good-{i}" for i in range(10)]
ABUSER = "abuser"
SHARE_RPS = 20.0  # each tenant's request rate; the abuser floods at 10x this


def key(tenant: str) -> str:
    return f"bench-key-{tenant}"


def manifest() -> dict:
    keys = {t: [{"sha256": hashlib.sha256(key(t).encode()).hexdigest()}] for t in GOOD + [ABUSER]}
    return {
        "schema_version": 2,
        "active": {"name": "mock", "provider": {"kind": "mock", "delay_ms": 20, "tokens_per_s": 400,
                                                  "reply_tokens": 1000}},  # good clients ask for 16
        "serving": {
            "default_budget_ms": 5000, "max_budget_ms": 60000, "max_concurrency": 64,
            "queue": {"size": 0}, "cache": {"enabled": False}, "api_keys": keys,
            "tenant_limits": {"*": {"concurrency_share": 0.125, "requests_per_s": SHARE_RPS, "burst": 20}},
            "ladder": {"enabled": True, "min_samples": 10},  # long answers must not move it for everyone
            "http": {"header_timeout_s": 5, "body_timeout_s": 5, "max_connections": 512},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(folder: Path) -> tuple[subprocess.Popen, str]:
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest()))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quantgate", "serve", str(path), "--port", str(port),
                             "--log-level", "error"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # bounded: 30 s
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not listen within 30 s")


# ------------------------------------------------------------------------------ well-behaved clients
async def good_client(url: str, tenant: str, rate: float, duration: float, out: list) -> None:
    import aiohttp

    headers = {"authorization": f"Bearer {key(tenant)}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async def one(i: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": f"{tenant} question {i}"}],
                    "max_tokens": 16}
            t = time.perf_counter()
            try:
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    out.append((time.perf_counter() - t, r.status))
            except Exception:  # noqa: BLE001 - a failed request is a result, not a crash
                out.append((time.perf_counter() - t, 0))

        n = int(duration * rate)
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):  # open loop: the schedule does not wait for answers
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)


# ------------------------------------------------------------------------------ the abuser
ATTACKS = ("flood", "slow", "cut", "half", "cjk", "empty", "long", "idle")


async def abuse(url: str, duration: float, attacks: tuple[str, ...] = ATTACKS) -> dict:
    import aiohttp

    end = time.perf_counter() + duration
    headers = {"authorization": f"Bearer {key(ABUSER)}"}
    counts = {"flood_sent": 0, "flood_429": 0, "slow_streams": 0, "cut_streams": 0, "half_headers": 0,
              "cjk_413": 0, "empty_413": 0, "long_answers": 0, "idle_sockets": 0}
    host, port = url.split("//")[1].split(":")

    async def flood(s) -> None:
        rate, i, t0, pending = 10 * SHARE_RPS, 0, time.perf_counter(), set()

        async def one(n: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": f"flood {n}"}], "max_tokens": 16}
            try:
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    counts["flood_429"] += r.status == 429
            except Exception:  # noqa: BLE001
                pass

        while time.perf_counter() < end:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            if len(pending) < 500:  # bounded
                t = asyncio.ensure_future(one(i))
                pending.add(t)
                t.add_done_callback(pending.discard)
                counts["flood_sent"] += 1
            i += 1
        await asyncio.gather(*pending)

    async def stream(s, cut: bool) -> None:
        body = {"model": "m", "stream": True, "max_tokens": 256,
                "messages": [{"role": "user", "content": "a long story"}]}
        while time.perf_counter() < end:
            try:
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    if cut:
                        await r.content.read(64)
                        counts["cut_streams"] += 1
                        r.close()  # drop the connection mid-answer
                        await asyncio.sleep(0.25)  # paced: the flood above is the 10x part
                        continue
                    counts["slow_streams"] += 1
                    while time.perf_counter() < end and await r.content.read(16):
                        await asyncio.sleep(0.2)  # a slow reader
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.05)

    async def half_headers() -> None:
        while time.perf_counter() < end:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                counts["half_headers"] += 1
                await asyncio.wait_for(reader.read(), max(0.1, end - time.perf_counter()))
                writer.close()
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.05)

    async def oversized(s, what: str) -> None:  # refused with 413 before any work, or it is a finding
        content = [{"role": "user", "content": "漢" * 32_760}] if what == "cjk" else \
            [{"role": "user", "content": ""}] * 31_000
        body = json.dumps({"model": "m", "max_tokens": 16, "messages": content}).encode()
        while time.perf_counter() < end:
            try:
                async with s.post(url + "/v1/chat/completions", data=body,
                                  headers={**headers, "content-type": "application/json"}) as r:
                    await r.read()
                    counts[f"{what}_413"] += r.status == 413
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(0.1)

    async def long_answers(s) -> None:
        body = {"model": "m", "max_tokens": 900, "messages": [{"role": "user", "content": "write a novel"}]}
        while time.perf_counter() < end:
            try:
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    counts["long_answers"] += r.status == 200
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.05)

    async def idle_sockets(source: str, n: int) -> None:  # connect and never send a byte
        held = []
        for _ in range(n):
            try:
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind((source, 0))
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
                held.append(sock)
                counts["idle_sockets"] += 1
            except OSError:
                sock.close()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        for sock in held:
            sock.close()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=duration + 5)) as s:
        make = {"flood": lambda: [flood(s)], "slow": lambda: [stream(s, False) for _ in range(4)],
                "cut": lambda: [stream(s, True) for _ in range(4)], "half": lambda: [half_headers() for _ in range(50)],
                "cjk": lambda: [oversized(s, "cjk")], "empty": lambda: [oversized(s, "empty")],
                "long": lambda: [long_answers(s) for _ in range(6)],
                "idle": lambda: [idle_sockets(f"127.0.0.{i}", 150) for i in range(2, 7)]}
        await asyncio.gather(*[c for name in attacks for c in make[name]()])
    return counts


# ------------------------------------------------------------------------------ rounds
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def one_round(kind: str, duration: float, rate: float, folder: Path, attacks: tuple[str, ...] = ATTACKS) -> dict:
    proc, url = start_gateway(folder)
    abuser = None
    try:
        if kind == "abuse":
            abuser = subprocess.Popen([sys.executable, __file__, "--abuser", url, str(duration + 1),
                                       "--attacks", ",".join(attacks)],
                                      stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # let the flood build up before the measured clients start
        out: list = []

        async def main():
            await asyncio.gather(*[good_client(url, t, rate, duration, out) for t in GOOD])
        asyncio.run(main())
        counts = json.loads(abuser.communicate(timeout=duration + 60)[0]) if abuser else {}
    finally:
        if abuser and abuser.poll() is None:
            abuser.kill()
        proc.terminate()
        proc.wait(10)
    ok = [lat for lat, st in out if st == 200]
    return {"kind": kind, "latencies_ms": [round(x * 1000, 3) for x in ok], "requests": len(out), "ok": len(ok), "success": len(ok) / max(1, len(out)),
            "p50_ms": pct(ok, 50) * 1000, "p99_ms": pct(ok, 99) * 1000, "abuser": counts,
            "statuses": {str(st): sum(1 for _, x in out if x == st) for st in sorted({x for _, x in out})}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of quiet/abuse rounds")
    ap.add_argument("--rate", type=float, default=5.0, help="requests/s per well-behaved tenant")
    ap.add_argument("--attacks", default=",".join(ATTACKS),
                    help=f"which attacks the abuser runs, comma-separated (default all: {','.join(ATTACKS)})")
    ap.add_argument("--abuser", nargs=2, metavar=("URL", "SECONDS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    attacks = tuple(x for x in a.attacks.split(",") if x)
    if unknown := [x for x in attacks if x not in ATTACKS]:
        ap.error(f"--attacks: unknown {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    if a.abuser:
        print(json.dumps(asyncio.run(abuse(a.abuser[0], float(a.abuser[1]), attacks))))
        return
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for kind in ("quiet", "abuse") if r % 2 == 0 else ("abuse", "quiet"):
                res = one_round(kind, a.duration, a.rate, Path(tmp), attacks)
                rounds.append(res)
                print(f"  round {r + 1} {kind:5}: {res['ok']}/{res['requests']} ok, P50 {res['p50_ms']:.1f} ms, "
                      f"P99 {res['p99_ms']:.1f} ms {res['abuser'] or ''}", file=sys.stderr)
    summary = {}
    for kind in ("quiet", "abuse"):
        rs = [x for x in rounds if x["kind"] == kind]
        n, ok = sum(x["requests"] for x in rs), sum(x["ok"] for x in rs)
        pooled = [v / 1000 for x in rs for v in x["latencies_ms"]]
        summary[kind] = {"requests": n, "ok": ok, "success": ok / max(1, n),
                         "p99_ms": pct(pooled, 99) * 1000, "p50_ms": pct(pooled, 50) * 1000}
    q, b = summary["quiet"], summary["abuse"]
    ratio_p99 = b["p99_ms"] / q["p99_ms"] if q["p99_ms"] else float("nan")
    print(f"\n{'':8}{'requests':>10}{'success':>10}{'P50 ms':>10}{'P99 ms':>10}")
    for kind in ("quiet", "abuse"):
        s = summary[kind]
        print(f"{kind:8}{s['requests']:>10}{s['success']:>10.3f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}")
    print(f"\nabuse/quiet P99 = {ratio_p99:.3f}, success {b['success']:.3f} vs {q['success']:.3f} "
          f"(target: P99 ratio ≤ 1.10, success within 0.10); P99 rests on {q['ok']} and {b['ok']} answers")
    out = REPO / "bench" / "results" / f"abuse-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(a),
                               "rounds": rounds, "summary": summary, "p99_ratio": ratio_p99}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
