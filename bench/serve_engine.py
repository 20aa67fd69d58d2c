"""The gateway in front of a real engine versus the engine direct, side by side in one run.

The engine is vLLM's CPU build (its own interpreter, found as `quantgate engines --list` finds it:
$QUANTGATE_VLLM_PYTHON, else $QUANTGATE_ENGINES_HOME/vllm-venv) serving the bundled SmolLM2-135M
baseline (or --artifact: a candidate folder the format table lets vLLM serve). Started here, on
loopback, through quantgate.procs (its own process group, stopped at the end).

Two targets answer the same streamed POST /v1/chat/completions:

  direct    the engine itself
  gateway   quantgate's gateway (its own process), a manifest whose active deployment is the
            `openai` provider pointing at that engine; every guard on (API key, tenant/user/global
            budgets, concurrency gate, cache, degrade ladder, metrics). The ladder's latency
            thresholds are set out of reach and there is no fallback: a CPU engine is slow enough
            to trip the default ladder, which would shorten answers or hand them to a mock and
            make the gateway look faster than the engine it fronts.

Every request is a short one (--prompt-tokens 64, --output-tokens 16 with ignore_eos, which the
gateway passes on), with a unique prefix, so neither vLLM's prefix cache nor the gateway's response
cache turns the test into a cache test. quantgate's own load generator times every request
(TTFT = first streamed token, E2E = last byte). The targets are measured in interleaved rounds
(--rounds; the order flips each round), so a change in the machine's other load hits both alike:

  latency      concurrency 1 (--latency-concurrency): added P50 TTFT and E2E, gateway − direct,
               over every request of every round; target ≤ 2 ms
  throughput   concurrency 16 (--throughput-concurrency): successful requests/s, gateway/direct,
               over the summed wall time of the rounds; target ≥ 95%
  gateway CPU  the gateway process's CPU time per request (from /proc): what it costs whoever
               else wants the cores, which depends far less on that other load than latency does

Then the blue/green switch (--switch-concurrency requests in flight all along, non-streamed): the
gateway serves a deployment `blue` whose vLLM it starts and supervises itself (quantgate.serve.
supervisor); the manifest is rewritten to name `green` (the same checkpoint under another served
name: another engine identity, so another process). Measured from the manifest write: when /readyz
names green active (its engine started, ready and probed, engine start included), when green first
answers a request, and how many requests failed (the target is 0) and which side served each.

On a small shared machine vLLM, the gateway and the load generator share the cores: read the
ratios and the added milliseconds beside the load average printed with them, and repeat the run.

    .venv/bin/python bench/serve_engine.py [--rounds 3] [--latency-requests 20] [--throughput-requests 64]

Writes bench/results/serve-engine-<time>.json (atomically). Exits 1 with the fix when the vLLM
interpreter is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
# bench/gateway.py (servers, manifest, counts) and bench/replicas.py (CPU time) are imported by name:
# run as a script, this folder is sys.path[0]

TARGETS = {"added_p50_ms": 2.0, "throughput_ratio": 0.95}
SERVED = "smollm2"


# ------------------------------------------------------------------ pure: rounds → figures
def _p(xs: list[float], q: float) -> float | None:
    from quantgate.evaluate.stats import percentile

    return percentile(xs, q)


def target_row(runs: list[dict]) -> dict:
    """One target's runs at one concurrency → one row. A run is {wall_s, ttft_ms: [...],
    e2e_ms: [...], tokens_out: [...], failed: int} (lists over its successful requests);
    percentiles pool every round's requests, throughput is over the summed wall time."""
    ttft = [x for r in runs for x in r["ttft_ms"]]
    e2e = [x for r in runs for x in r["e2e_ms"]]
    toks = [x for r in runs for x in r["tokens_out"]]
    wall = sum(r["wall_s"] for r in runs)
    return {"rounds": len(runs), "ok": len(e2e), "failed": sum(r["failed"] for r in runs), "wall_s": wall,
            "rps": len(e2e) / wall if wall else 0.0, "output_tok_s": sum(toks) / wall if wall else 0.0,
            "tokens_out_mean": sum(toks) / len(toks) if toks else None,
            "ttft_p10_ms": _p(ttft, 10), "ttft_p50_ms": _p(ttft, 50), "ttft_p95_ms": _p(ttft, 95),
            "e2e_p10_ms": _p(e2e, 10), "e2e_p50_ms": _p(e2e, 50), "e2e_p95_ms": _p(e2e, 95)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(runs: list[dict], latency_c: int, throughput_c: int) -> dict:
    """Every run ({target: direct|gateway, concurrency, round, ...}) → the rows per target and
    concurrency, the added latency and the throughput ratio (pooled, and per round to show the
    spread), each against its target."""
    def pick(target, c, rnd=None):
        return [r for r in runs if r["target"] == target and r["concurrency"] == c
                and (rnd is None or r["round"] == rnd)]

    rows = {f"{t}@{c}": target_row(pick(t, c)) for c in sorted({latency_c, throughput_c})
            for t in ("direct", "gateway") if pick(t, c)}
    out: dict = {"rows": rows}
    d, g = rows.get(f"direct@{latency_c}"), rows.get(f"gateway@{latency_c}")
    if d and g:
        rounds = sorted({r["round"] for r in pick("gateway", latency_c)})
        per_round = [_diff(target_row(pick("gateway", latency_c, k))["ttft_p50_ms"],
                           target_row(pick("direct", latency_c, k))["ttft_p50_ms"]) for k in rounds]
        out["latency"] = {
            "concurrency": latency_c, "requests_each": min(d["ok"], g["ok"]),
            "added_ttft_p50_ms": _diff(g["ttft_p50_ms"], d["ttft_p50_ms"]),
            "added_e2e_p50_ms": _diff(g["e2e_p50_ms"], d["e2e_p50_ms"]),
            "added_ttft_p50_ms_per_round": per_round, "target_ms": TARGETS["added_p50_ms"],
            # the least-disturbed requests: on a busy machine the P10 difference is nearer what the
            # gateway itself adds than the P50 one, which also holds the waits for a core
            "added_ttft_p10_ms": _diff(g["ttft_p10_ms"], d["ttft_p10_ms"]),
            "added_e2e_p10_ms": _diff(g["e2e_p10_ms"], d["e2e_p10_ms"])}
        worst = max((v for v in (out["latency"]["added_ttft_p50_ms"], out["latency"]["added_e2e_p50_ms"])
                     if v is not None), default=None)
        out["latency"]["met"] = worst is not None and worst <= TARGETS["added_p50_ms"] and g["failed"] == 0
    d, g = rows.get(f"direct@{throughput_c}"), rows.get(f"gateway@{throughput_c}")
    if d and g:
        rounds = sorted({r["round"] for r in pick("gateway", throughput_c)})
        per_round = [_ratio(target_row(pick("gateway", throughput_c, k))["rps"],
                            target_row(pick("direct", throughput_c, k))["rps"]) for k in rounds]
        ratio = _ratio(g["rps"], d["rps"])
        out["throughput"] = {
            "concurrency": throughput_c, "requests_each": min(d["ok"], g["ok"]), "ratio": ratio,
            "output_tok_s_ratio": _ratio(g["output_tok_s"], d["output_tok_s"]), "ratio_per_round": per_round,
            "target": TARGETS["throughput_ratio"],
            "met": ratio is not None and ratio >= TARGETS["throughput_ratio"] and g["failed"] == 0}
    return out


def run_of(report, target: str, concurrency: int, rnd: int) -> dict:
    """A load report → the run record summarise() reads (milliseconds, successful requests only)."""
    ok = [r for r in report.records if r.outcome == "ok"]
    return {"target": target, "concurrency": concurrency, "round": rnd, "wall_s": report.wall_s,
            "ttft_ms": [r.ttft_s * 1e3 for r in ok], "e2e_ms": [r.e2e_s * 1e3 for r in ok],
            "tokens_out": [r.tokens_out for r in ok], "failed": len(report.records) - len(ok),
            "errors": sorted({r.error for r in report.records if r.error})[:3]}


# ------------------------------------------------------------------ the engine and the gateway
def need_vllm() -> None:
    """Exit 2 with the setup line when vLLM's interpreter is missing (nothing is started)."""
    from quantgate.engines.available import check

    row = check("vllm")
    if not row["available"]:
        sys.exit(f"serve_engine: vLLM is not installed for quantgate here: {row['why']}")


def engine_server(artifact: str | None, work: Path, threads: int | None):
    """A not-yet-started ServerProcess for vLLM on the bundled baseline or on `artifact`."""
    from quantgate.procs import ServerProcess, free_port
    from quantgate.engines.spec import EngineSpec, engine_python
    from quantgate.formats import Artifact, artifact_of_candidate, expected
    from quantgate.models import resolve

    if artifact is None:
        art = Artifact(SERVED, str(resolve("bundled:smollm2-135m-instruct")), "dense", "baseline", dtype="float32")
    else:
        folder = Path(artifact).expanduser().resolve()
        cfg = folder / "config.json"
        if not cfg.is_file():
            sys.exit(f"serve_engine: --artifact {artifact}: no config.json there (give a checkpoint folder)")
        record = json.loads((folder / "candidate.json").read_text()) if (folder / "candidate.json").is_file() else {}
        art = artifact_of_candidate(SERVED, folder, record, json.loads(cfg.read_text()))
        sup = expected("vllm", art)
        if sup.status == "no":
            sys.exit(f"serve_engine: --artifact {artifact} ({art.label}): vLLM does not serve it on CPU: {sup.reason}")
    spec = EngineSpec(kind="vllm", dtype="bfloat16", kv_cache_gb=1, max_model_len=1024, threads=threads)
    port = free_port()
    cmd = spec.command_on(art, str(engine_python("vllm")[0]), port)
    return ServerProcess("vllm", cmd, port=port, log_path=work / "vllm.log", startup_timeout_s=1500), art


def engine_manifest(engine_url: str) -> dict:
    """bench/gateway.py's manifest (every guard on) with the engine as the active deployment, the
    ladder's latency thresholds out of reach and no fallback (see the module docstring)."""
    from gateway import gateway_manifest  # bench/gateway.py

    m = gateway_manifest("openai", engine_url)
    m["active"]["name"] = "bench-vllm"
    m["active"]["provider"] |= {"model": SERVED, "timeout_s": 300}
    s = m["serving"]
    s.pop("fallback")
    s["default_budget_ms"], s["max_budget_ms"] = 120_000, 300_000
    s["ladder"] |= {"light": {"p95_ms": 1e7, "max_tokens_factor": 0.75},
                    "moderate": {"p95_ms": 2e7, "error_rate": 0.05, "max_tokens_factor": 0.5},
                    "heavy": {"p95_ms": 4e7, "error_rate": 0.15, "max_tokens_factor": 0.25,
                              "concurrency_factor": 0.5}}
    return m


def tagged_client(base_url: str, tag: str, api_key: str | None = None):
    """quantgate's OpenAI client, with `tag` and the request id in front of every prompt: a prompt
    never repeats, so no cache (vLLM's prefix cache, the gateway's response cache) answers it."""
    import itertools

    from quantgate.evaluate.clients.openai_http import OpenAIClient

    sent = itertools.count()  # request ids restart with every load run: count the client's own

    class Tagged(OpenAIClient):
        def body(self, req):
            b = super().body(req)
            first = b["messages"][0]
            b["messages"] = [{**first, "content": f"{tag}-{next(sent)} {first['content']}"}, *b["messages"][1:]]
            return b

    return Tagged(base_url, SERVED, api_key=api_key, timeout=300)


def workload(concurrency: int, requests: int, prompt_tokens: int, output_tokens: int):
    from quantgate.workload import LengthClass, WorkloadSpec

    return WorkloadSpec(requests=requests, concurrency=concurrency, warmup_requests=0, timeout_s=300,
                        mix=[LengthClass(name="short", prompt_tokens=prompt_tokens, output_tokens=output_tokens)])


async def measure_rounds(urls: dict[str, tuple[str, str | None]], gateway_pid: int, a, log=print) -> tuple[list, dict]:
    """The interleaved rounds. Returns (runs, gateway CPU {seconds, requests})."""
    from quantgate.evaluate.loadgen import PromptSource, run_load
    from quantgate.evaluate.prompts import FALLBACK_TEXT
    from replicas import cpu_s

    prompts = PromptSource(FALLBACK_TEXT)
    run_id = os.urandom(3).hex()
    clients = {name: tagged_client(url, f"{run_id}{name[0]}", key) for name, (url, key) in urls.items()}
    runs, cpu = [], {"seconds": 0.0, "requests": 0}
    for c in clients.values():
        await c.start()
    try:
        for name, c in clients.items():  # warm-up: connections, the gateway's pools, vLLM's batch shapes
            for conc in (a.throughput_concurrency, a.latency_concurrency):
                await run_load(c, workload(conc, conc * 2, a.prompt_tokens, a.output_tokens), prompts)
        for rnd in range(a.rounds):
            order = list(clients) if rnd % 2 == 0 else list(clients)[::-1]
            for conc, n in ((a.latency_concurrency, a.latency_requests),
                            (a.throughput_concurrency, a.throughput_requests)):
                for name in order:
                    c0 = cpu_s(gateway_pid) if name == "gateway" else 0.0
                    rep = await run_load(clients[name], workload(conc, n, a.prompt_tokens, a.output_tokens), prompts)
                    if name == "gateway":
                        cpu["seconds"] += cpu_s(gateway_pid) - c0
                        cpu["requests"] += len(rep.records)
                    run = run_of(rep, name, conc, rnd)
                    runs.append(run)
                    log(f"  round {rnd + 1}/{a.rounds} c={conc:<3d} {name:8s} {len(run['e2e_ms']):4d} ok "
                        f"{run['failed']} failed  {len(run['e2e_ms']) / rep.wall_s:6.2f} req/s  "
                        f"TTFT p50 {_p(run['ttft_ms'], 50) or 0:7.1f} ms  E2E p50 {_p(run['e2e_ms'], 50) or 0:7.1f} ms"
                        + (f"  ({run['errors'][0]})" if run["errors"] else ""))
    finally:
        for c in clients.values():
            await c.close()
    return runs, cpu


# ------------------------------------------------------------------ the switch
def engine_deployment(name: str, art, threads: int | None) -> dict:
    """A manifest deployment whose vLLM the gateway starts itself, serving `art` as `name`."""
    from quantgate.engines.spec import EngineSpec, engine_python
    from quantgate.integrity import folder_checksums

    # the engine as promote writes it: its spec, from which the supervisor builds the command
    spec = EngineSpec(kind="vllm", dtype="bfloat16", kv_cache_gb=1, max_model_len=1024, threads=threads,
                      startup_timeout_s=1500, source="bench/serve_engine.py")
    engine = spec.resolved_for(art, str(engine_python("vllm")[0]))
    return {"name": name, "model_version": "1", "artifact": art.path, "files": folder_checksums(Path(art.path)),
            "provider": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": name, "timeout_s": 300},
            "engine": engine.model_dump(mode="json")}


def switch_manifest(active: dict) -> dict:
    m = engine_manifest("http://127.0.0.1:8000")
    m["active"] = active
    m["serving"]["reload_interval_s"] = 0.2
    return m


def switch_summary(events: list[dict], t_write: float, t_switched: float | None, old: str, new: str) -> dict:
    """Requests sent across a switch ({sent, done, ok, deployment}, seconds on one clock) → when the
    new deployment first answered, how many requests each side served and how many failed."""
    firsts = [e["done"] for e in events if e["ok"] and e["deployment"] == new]
    during = [e for e in events if e["sent"] >= t_write and (not firsts or e["sent"] <= min(firsts))]
    return {"from": old, "to": new, "requests": len(events), "failed": sum(not e["ok"] for e in events),
            "failed_during_switch": sum(not e["ok"] for e in during),
            "served_by_old": sum(e["ok"] and e["deployment"] == old for e in events),
            "served_by_new": len(firsts),
            "switched_s": None if t_switched is None else t_switched - t_write,
            "first_served_by_new_s": min(firsts) - t_write if firsts else None,
            "errors": sorted({e["error"] for e in events if e.get("error")})[:3]}


async def measure_switch(gw_url: str, mpath: Path, new_manifest: dict, new: str, old: str, *, concurrency: int,
                         output_tokens: int, after_requests: int = 8, timeout_s: float = 1800, log=print) -> dict:
    """Steady load through the gateway; the manifest is rewritten to `new_manifest`; returns the
    switch's figures once the new deployment has answered `after_requests` requests."""
    import aiohttp

    from gateway import ADMIN_KEY, API_KEY
    from quantgate.util import atomic_write_json

    events: list[dict] = []
    stop = asyncio.Event()
    t_write = t_switched = None
    sent = iter(range(1 << 40))

    async def worker(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            body = {"model": new, "max_tokens": output_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"switch {next(sent)}: tell me about the rivers"}]}
            e = {"sent": time.monotonic(), "ok": False, "deployment": None}
            try:
                async with s.post(gw_url + "/v1/chat/completions", json=body) as r:
                    data = await r.json(content_type=None)
                    e["ok"] = r.status == 200
                    e["deployment"] = data.get("model") if e["ok"] else None
                    if not e["ok"]:
                        e["error"] = f"HTTP {r.status}: {str(data.get('error', data))[:160]}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                e["error"] = f"{type(exc).__name__}: {exc}"
            e["done"] = time.monotonic()
            events.append(e)

    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {API_KEY}"},
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        tasks = [asyncio.ensure_future(worker(s)) for _ in range(concurrency)]
        try:
            deadline = time.monotonic() + timeout_s
            while len(events) < 2 * concurrency:  # load running before the switch (none when idle)
                await asyncio.sleep(0.1)
            t_write = time.monotonic()
            atomic_write_json(mpath, new_manifest)
            log(f"  manifest now names {new}: the gateway starts its engine beside {old}'s")
            while time.monotonic() < deadline:
                async with s.get(gw_url + "/readyz", headers={"authorization": f"Bearer {ADMIN_KEY}"}) as r:
                    ready = await r.json(content_type=None)
                if t_switched is None and str(ready.get("active", "")).startswith(new + "@"):
                    t_switched = time.monotonic()
                    log(f"  switched after {t_switched - t_write:.1f} s")
                if ready.get("engine_switch_failed"):
                    log(f"  the switch failed: {ready['engine_switch_failed'].get('error')}")
                    break
                if sum(e["ok"] and e["deployment"] == new for e in events) >= after_requests:
                    break
                if concurrency == 0 and t_switched is not None:  # idle: one request shows who answers
                    tasks.append(asyncio.ensure_future(worker(s)))
                    while not events:
                        await asyncio.sleep(0.05)
                    break
                await asyncio.sleep(0.1)  # polling the gateway's own state under a deadline
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    return switch_summary(events, t_write, t_switched, old, new)


def run_switch(a, art, work: Path) -> dict:
    """The gateway serves `blue` (a vLLM it starts itself); the manifest changes to `green` (another
    vLLM process: a different served name, so a different engine identity), then back, and so on:
    one switch per entry of --switch-loads (concurrent clients with unique prompts; 0 = idle), so the
    switch under load and the idle one are measured by the same gateway on a warm compile cache."""
    from gateway import API_KEY, Target, free_port

    from quantgate.util import atomic_write_json

    blue, green = engine_deployment("blue", art, a.threads), engine_deployment("green", art, a.threads)
    mpath = work / "switch" / "manifest.json"
    mpath.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mpath, switch_manifest(blue))
    port = free_port()
    gw = Target("serve-engine-switch", [sys.executable, str(BENCH / "gateway.py"), "--serve-gateway", str(port),
                                        str(mpath)], port, "/healthz", auth=API_KEY)
    print(f"blue/green switch: the gateway starts blue's vLLM; engine logs in {mpath.parent / 'logs'}", flush=True)
    try:
        gw.start(timeout_s=120)
        t0 = time.monotonic()
        wait_ready(gw.url, "blue", 1800)
        print(f"  blue ready after {time.monotonic() - t0:.1f} s", flush=True)
        switches, deps, now = [], {"blue": blue, "green": green}, "blue"
        for load in a.switch_loads:
            new = "green" if now == "blue" else "blue"
            out = asyncio.run(measure_switch(gw.url, mpath, switch_manifest(deps[new]), new, now,
                                             concurrency=load, output_tokens=a.output_tokens))
            switches.append({"measured": True, "concurrency": load, "loadavg": os.getloadavg()[0], **out})
            print_switch(switches[-1])
            if out["switched_s"] is None:
                break
            now = new
            wait_ready(gw.url, now, 600)  # the old engine stopped, the new one alone before the next switch
    finally:
        gw.stop()
    return {"measured": True, "switches": switches, **switch_ratio(switches)}


def switch_ratio(switches: list[dict]) -> dict:
    """The slowest switch under load over the slowest idle one (target ≤ 1.5), and failures in all."""
    idle = [s["switched_s"] for s in switches if s["concurrency"] == 0 and s["switched_s"] is not None]
    loaded = [s["switched_s"] for s in switches if s["concurrency"] > 0 and s["switched_s"] is not None]
    return {"idle_s": max(idle) if idle else None, "loaded_s": max(loaded) if loaded else None,
            "loaded_over_idle": round(max(loaded) / max(idle), 2) if idle and loaded else None,
            "failed": sum(s["failed"] for s in switches)}


def wait_ready(url: str, active: str, timeout_s: float) -> None:
    import httpx

    from gateway import ADMIN_KEY

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            body = httpx.get(url + "/readyz", headers={"x-api-key": ADMIN_KEY}, timeout=5).json()
            engines = (body.get("engines") or {}).values()
            if (body.get("status") == "ready" and str(body.get("active", "")).startswith(active + "@")
                    and all(e.get("state") == "ready" for e in engines)):
                return
            if any(e.get("state") == "failed" for e in engines):
                raise RuntimeError(f"{active}'s engine failed to start: {json.dumps(body)[:600]}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)  # polling the gateway's readiness under a deadline
    raise RuntimeError(f"{active} not ready within {timeout_s:g} s")


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (direct and gateway each round)")
    ap.add_argument("--latency-concurrency", type=int, default=1)
    ap.add_argument("--latency-requests", type=int, default=20, help="requests per target per round at it")
    ap.add_argument("--throughput-concurrency", type=int, default=16)
    ap.add_argument("--throughput-requests", type=int, default=64, help="requests per target per round at it")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="about this many prompt tokens a request")
    ap.add_argument("--output-tokens", type=int, default=16, help="tokens a request generates (ignore_eos)")
    ap.add_argument("--switch", choices=("auto", "skip", "only"), default="auto",
                    help="the blue/green switch part: auto = when the gateway supervises engines; only = just it")
    ap.add_argument("--switch-loads", type=lambda v: [int(x) for x in v.split(",")], default=[0, 4, 0, 4],
                    help="one blue/green switch per entry, alternating direction: concurrent clients with unique "
                         "prompts through the gateway during it (0 = idle)")
    ap.add_argument("--artifact", help="a checkpoint folder vLLM serves instead of the bundled baseline "
                    "(a quantgate candidate folder: the format table must allow vLLM on CPU)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for vLLM (default: vLLM's own choice)")
    ap.add_argument("--engine-url", help="measure an OpenAI-compatible engine that is already running (serving "
                    f"the model as '{SERVED}') instead of starting vLLM here (no switch part)")
    ap.add_argument("--out", help="result file (default: bench/results/serve-engine-<time>.json)")
    a = ap.parse_args()
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the engines and gateways started here are stopped
    signal.signal(signal.SIGTERM, _interrupt)
    for k in ("rounds", "latency_concurrency", "latency_requests", "throughput_concurrency", "throughput_requests",
              "prompt_tokens", "output_tokens"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if not a.switch_loads or min(a.switch_loads) < 0:
        ap.error("--switch-loads: one non-negative client count per switch, e.g. 0,4,0,4")
    if a.engine_url and a.switch == "only":
        ap.error("--switch only starts its own engines through the gateway: drop --engine-url")
    if a.engine_url is None:
        need_vllm()
    from quantgate.util import atomic_write_json

    work = Path(tempfile.mkdtemp(prefix="bench-serve-engine-"))
    meta = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
            "args": vars(a), "engine_url": a.engine_url, "engine": None, "artifact": None}
    report: dict = {}
    art = None
    if a.switch != "only":
        report, art = side_by_side(a, work, meta)
    if a.switch == "skip" or a.engine_url:
        report["switch"] = {"measured": False, "why": "skipped (--switch skip or --engine-url)"}
    else:
        try:
            report["switch"] = run_switch(a, art or engine_server(a.artifact, work, a.threads)[1], work)
        except RuntimeError as exc:
            report["switch"] = {"measured": False, "why": f"failed: {exc}"}
    meta["loadavg_after"] = os.getloadavg()
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"serve-engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(out, {"meta": meta, **report})  # first: a printing fault loses nothing
    print_report(report, meta)
    print(f"wrote {out}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def side_by_side(a, work: Path, meta: dict):
    """Direct vs through the gateway (the `openai` provider → the engine started here). Returns
    (the report with its runs, the artifact served)."""
    from gateway import API_KEY, Target, free_port, gateway_counts

    from quantgate.procs import EngineStartError

    engine, art = (None, None) if a.engine_url else engine_server(a.artifact, work, a.threads)
    engine_url = a.engine_url.rstrip("/").removesuffix("/v1") if a.engine_url else engine.base_url
    gw = None
    try:
        if engine is not None:
            print(f"starting vLLM on {art.label} ({art.path}); log: {work / 'vllm.log'}", flush=True)
            try:
                engine.start()
            except EngineStartError as exc:
                sys.exit(f"serve_engine: {exc}")
            print(f"  ready in {engine.record.startup_s:.1f} s at {engine_url}", flush=True)
        mpath = work / "manifest.json"
        mpath.write_text(json.dumps(engine_manifest(engine_url)))
        port = free_port()
        gw = Target("serve-engine-gateway", [sys.executable, str(BENCH / "gateway.py"), "--serve-gateway", str(port),
                                             str(mpath)], port, "/healthz", auth=API_KEY)
        gw.start(timeout_s=120)
        runs, cpu = asyncio.run(measure_rounds({"direct": (engine_url, None), "gateway": (gw.url, API_KEY)},
                                               gw.proc.pid, a))
        counts = gateway_counts(gw.url)
    finally:
        if gw is not None:
            gw.stop()
        if engine is not None:
            engine.stop()
    report = summarise(runs, a.latency_concurrency, a.throughput_concurrency)
    report["gateway_cpu_us_per_request"] = cpu["seconds"] / cpu["requests"] * 1e6 if cpu["requests"] else None
    report["gateway_counts"] = counts
    report["runs"] = runs
    meta |= {"engine_url": engine_url, "engine": engine.record.to_dict() if engine else None,
             "artifact": art.to_dict() | {"label": art.label} if art else None}
    return report, art


def print_report(report: dict, meta: dict) -> None:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    sw = report["switch"]
    if "rows" not in report:
        print(f"\nload average {meta['loadavg_before'][0]:.2f} before, {meta['loadavg_after'][0]:.2f} after "
              f"({meta['cpus']} cores)")
        return print_switch(sw)
    what = f"vLLM ({meta['artifact']['label']})" if meta["artifact"] else meta["engine_url"]
    print(f"\n{what} direct vs through the gateway, interleaved rounds; "
          f"load average {meta['loadavg_before'][0]:.2f} before, {meta['loadavg_after'][0]:.2f} after "
          f"({meta['cpus']} cores)")
    print(f"{'target':8} {'conc':>4} {'ok':>5} {'failed':>6} {'req/s':>7} {'tok/s':>7} {'out tok':>7} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'E2E p50':>8} {'E2E p95':>8}  (ms)")
    for key, r in report["rows"].items():
        name, c = key.split("@")
        print(f"{name:8} {c:>4} {r['ok']:>5} {r['failed']:>6} {r['rps']:>7.2f} {r['output_tok_s']:>7.1f} "
              f"{f(r['tokens_out_mean'], '{:.1f}'):>7} {f(r['ttft_p50_ms'], '{:.1f}'):>9} "
              f"{f(r['ttft_p95_ms'], '{:.1f}'):>9} {f(r['e2e_p50_ms'], '{:.1f}'):>8} {f(r['e2e_p95_ms'], '{:.1f}'):>8}")
    lat, thr = report.get("latency"), report.get("throughput")
    if lat:
        rounds = ", ".join(f(x) for x in lat["added_ttft_p50_ms_per_round"])
        print(f"added P50 at c={lat['concurrency']}: TTFT {f(lat['added_ttft_p50_ms'])} ms, "
              f"E2E {f(lat['added_e2e_p50_ms'])} ms (target ≤ {lat['target_ms']:g}; per round TTFT: {rounds}) → "
              + ("met" if lat["met"] else "NOT MET"))
        print(f"added P10 at c={lat['concurrency']} (the least-disturbed requests): TTFT {f(lat['added_ttft_p10_ms'])} ms, "
              f"E2E {f(lat['added_e2e_p10_ms'])} ms")
    if thr:
        rounds = ", ".join(f(x, "{:.1%}") for x in thr["ratio_per_round"])
        print(f"throughput at c={thr['concurrency']}: gateway/direct {f(thr['ratio'], '{:.1%}')} requests/s, "
              f"{f(thr['output_tok_s_ratio'], '{:.1%}')} tokens/s (target ≥ {thr['target']:.0%}; per round: {rounds}) → "
              + ("met" if thr["met"] else "NOT MET"))
    n = report["gateway_counts"]
    print(f"gateway CPU per request: {f(report['gateway_cpu_us_per_request'], '{:.0f}')} µs; gateway counted "
          f"{n['errors']:.0f} failed, {n['429']:.0f} refused (429), {n['cached']:.0f} answered from its cache")
    print_switch(sw)


def print_switch(sw: dict) -> None:
    def f(x):
        return "-" if x is None else f"{x:.1f} s"

    if not sw.get("measured"):
        print(f"blue/green switch: {sw['why']}")
        return
    if "switches" in sw:
        print(f"blue/green: slowest switch under load {f(sw['loaded_s'])}, idle {f(sw['idle_s'])}: "
              f"{sw['loaded_over_idle']}x (target ≤ 1.5); {sw['failed']} failed requests in all")
        return
    print(f"blue/green switch {sw['from']} → {sw['to']} " + (f"under steady load (concurrency {sw['concurrency']}), "
          if sw["concurrency"] else "idle, ") +
          f"engine start included: manifest written → switched {f(sw['switched_s'])}, → first request served by "
          f"{sw['to']} {f(sw['first_served_by_new_s'])}; {sw['requests']} requests, {sw['failed']} failed "
          f"({sw['failed_during_switch']} during the switch); {sw['served_by_old']} served by {sw['from']}, "
          f"{sw['served_by_new']} by {sw['to']}" + (f"; errors: {sw['errors']}" if sw["errors"] else ""))


if __name__ == "__main__":
    main()
