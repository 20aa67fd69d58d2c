"""Gateway replicas sharing state through Redis: throughput with 1, 2 and 3 replicas vs one replica
with local (in-memory) state, in one run, against the same zero-delay mock upstream.

Every variant serves the same manifest (bench/gateway.py's `gateway-mock`: API key, tenant/user/
global budgets, cache on with unique prompts so it never hits, degrade ladder, metrics); the shared
variants add `serving.state.redis`, so each request reserves and settles its budgets and rate
buckets in Redis (Lua) and looks the cache up there. One asyncio load generator holds `--concurrency`
connections and spreads requests round-robin over the replicas (a client-side balancer: no proxy
process to share the cores with). Variants are measured in interleaved rounds, so a change in the
machine's other load hits them alike; read the ratios.

Redis round trips per request: the replicas' own count (`quantgate_redis_round_trips_total`, a batch
of background writes counts once) over the requests they answered; Redis commands per request
(Redis's `total_commands_processed`, which counts the commands the Lua scripts run) beside it.

Every process (load generator, Redis, each replica) shares the machine's cores: with 2 cores, two
replicas cannot get a core each while the load generator and Redis also need CPU, so the replica
speed-up measured here is a floor, not what N machines would give.

    .venv/bin/python bench/replicas.py [--duration 6] [--rounds 3] [--concurrency 64]

Writes bench/results/replicas-<time>.json. Needs redis-server on PATH (Debian: redis-server).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import ADMIN_KEY, API_KEY, REPO, Target, free_port, gateway_manifest, load_async  # noqa: E402

VARIANTS = {"local-1": (False, 1), "redis-1": (True, 1), "redis-2": (True, 2), "redis-3": (True, 3)}


def redis_info(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO stats\r\n")
        buf = b""
        while b"total_commands_processed" not in buf or not buf.endswith(b"\r\n"):
            buf += s.recv(65536)
    line = next(x for x in buf.decode().splitlines() if x.startswith("total_commands_processed:"))
    return int(line.split(":")[1])


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trips(urls: list[str]) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    n = 0.0
    for u in urls:
        text = httpx.get(u + "/metrics", timeout=5, headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
        for fam in text_string_to_metric_families(text):
            n += sum(s.value for s in fam.samples if s.name == "quantgate_redis_round_trips_total")
    return n


def load(urls: list[str], conc: int, duration: float, tag: str) -> dict:
    """The same asyncio load generator as bench/gateway.py, spread over the replicas."""
    return load_async(urls, conc, duration, API_KEY, f"{tag} ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of load per variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is cut into")
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server is not on PATH (Debian: apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    rport = free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:  # readiness poll: Redis answers INFO once it is up
        try:
            redis_info(rport)
            break
        except OSError:
            if time.monotonic() > deadline or redis.poll() is not None:
                sys.exit("redis-server did not start")
            time.sleep(0.05)
    py = sys.executable
    gw = str(REPO / "bench" / "gateway.py")
    groups: dict[str, list[Target]] = {}
    for name, (shared, n) in VARIANTS.items():
        m = gateway_manifest("mock", "")
        if shared:
            m["serving"]["state"] = {"redis": f"redis://127.0.0.1:{rport}/0"}
        path = work / f"manifest.{name}.json"
        path.write_text(json.dumps(m))
        groups[name] = []
        for i in range(n):
            port = free_port()
            groups[name].append(Target(f"{name}-{i}", [py, gw, "--serve-gateway", str(port), str(path)], port,
                                       "/healthz", auth=API_KEY))
    rows = {name: [] for name in VARIANTS}
    trips = {name: [] for name in VARIANTS}
    cmds = {name: [] for name in VARIANTS}
    cpu = {name: {"gateway": 0.0, "redis": 0.0} for name in VARIANTS}
    try:
        for ts in groups.values():
            for t in ts:
                t.start(timeout_s=120)
        for name, ts in groups.items():  # warm-up: connections, caches, the Lua scripts loaded
            load([t.url for t in ts], a.concurrency, 1.0, f"warm-{name}")
        for r in range(a.rounds):
            for name, ts in groups.items():
                urls = [t.url for t in ts]
                before, rt0 = redis_info(rport), round_trips(urls)
                g0, r0 = sum(cpu_s(t.proc.pid) for t in ts), cpu_s(redis.pid)
                row = load(urls, a.concurrency, a.duration / a.rounds, f"{r}-{name}")
                cpu[name]["gateway"] += sum(cpu_s(t.proc.pid) for t in ts) - g0
                cpu[name]["redis"] += cpu_s(redis.pid) - r0
                cmds[name].append((redis_info(rport) - before - 1) / max(1, row["requests"]))
                trips[name].append((round_trips(urls) - rt0) / max(1, row["requests"]))
                rows[name].append(row)
    finally:
        for ts in groups.values():
            for t in ts:
                t.stop()
        redis.terminate()
        redis.wait(10)
    report = {"concurrency": a.concurrency, "duration_s": a.duration, "rounds": a.rounds,
              "cores": os.cpu_count(), "machine": platform.platform(), "variants": {}}
    for name, parts in rows.items():
        secs, n = sum(p["secs"] for p in parts), sum(p["requests"] for p in parts)
        report["variants"][name] = {
            "replicas": VARIANTS[name][1], "shared": VARIANTS[name][0], "requests": n, "rps": n / secs,
            "p50_ms": sorted(p["p50_ms"] for p in parts)[len(parts) // 2],
            "non2xx": sum(p["non2xx"] for p in parts), "socket_errors": sum(p["socket_errors"] for p in parts),
            "redis_round_trips_per_request": round(sum(trips[name]) / len(trips[name]), 2),
            "redis_commands_per_request": round(sum(cmds[name]) / len(cmds[name]), 2),
            # CPU per request does not depend on who else wanted the cores: the cost to compare
            "gateway_cpu_us_per_request": round(cpu[name]["gateway"] / max(1, n) * 1e6, 1),
            "redis_cpu_us_per_request": round(cpu[name]["redis"] / max(1, n) * 1e6, 1)}
    v = report["variants"]
    report["ratios"] = {"redis-1 / local-1": v["redis-1"]["rps"] / v["local-1"]["rps"],
                        "CPU per request, redis-1 (gateway + redis) / local-1": (
                            v["redis-1"]["gateway_cpu_us_per_request"] + v["redis-1"]["redis_cpu_us_per_request"])
                        / max(1e-9, v["local-1"]["gateway_cpu_us_per_request"]),
                        "redis-2 / redis-1": v["redis-2"]["rps"] / v["redis-1"]["rps"],
                        "redis-3 / redis-1": v["redis-3"]["rps"] / v["redis-1"]["rps"]}
    print(f"concurrency {a.concurrency}, {a.rounds} interleaved rounds of {a.duration / a.rounds:.1f} s, "
          f"{os.cpu_count()} cores shared by the load generator, Redis and every replica")
    print(f"{'variant':10} {'replicas':>8} {'req/s':>9} {'p50 ms':>8} {'non2xx':>7} {'round trips/req':>16} "
          f"{'redis cmds/req':>15} {'gw CPU us/req':>14} {'redis CPU us/req':>17}")
    for name, x in v.items():
        print(f"{name:10} {x['replicas']:>8} {x['rps']:>9.0f} {x['p50_ms']:>8.1f} {x['non2xx']:>7} "
              f"{x['redis_round_trips_per_request']:>16.2f} {x['redis_commands_per_request']:>15.2f} "
              f"{x['gateway_cpu_us_per_request']:>14.0f} {x['redis_cpu_us_per_request']:>17.0f}")
    for k, x in report["ratios"].items():
        print(f"{k:52} {x:.2f}")
    out = REPO / "bench" / "results" / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
