"""Measure one artifact × engine pair: what the format table expects, the observed start (the
kernel, or the engine's own failure message), and the measurement — for a server quantgate
launches, one already running, or the in-process transformers engine in a child process.
Launched servers are always stopped, whatever happens to the measurement."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..engine_spec import Served
from ..errors import QuantgateError
from ..formats import Artifact, expected
from ..procs import EngineStartError, ServerProcess, free_port
from ..util import atomic_write_json
from . import sweep as sw
from .logs import oom_in, read_log
from .measure import client, measure
from .spec import EngineSpec, engine_python


def _full_log(path: str) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []


def run_pair(name: str, spec: EngineSpec, art: Artifact, ctx: dict, log=print) -> tuple[dict, dict | None]:
    """(matrix cell, pair record or None). The pair record exists for every pair the table does
    not rule out; a pair that failed to start carries the engine's message and is not measured."""
    sup = expected(spec.kind, art, spec.device, spec.serves)
    cell = {"artifact": {**art.to_dict(), "label": art.label}, "engine": name, "engine_kind": spec.kind,
            "expected": sup.to_dict(), "observed": {"tried": False, "loads": None}}
    if spec.kind == "openai" and spec.serves and spec.serves != art.name:
        return cell, None
    if sup.status == "no" and (not ctx["selection"].probe_unsupported or not spec.launched):
        return cell, None
    pair = {"engine": name, "engine_kind": spec.kind, "artifact": cell["artifact"], "measured": False,
            "expected": sup.status, "threads": spec.threads, "device": spec.device}
    slug = f"{name}--{art.name}"
    log(f"→ {art.name} on {name} (table: {sup.status}{', ' + sup.kernel if sup.kernel else ''})")
    try:
        if spec.launched:
            got = _launched(name, spec, art, ctx, slug, log)
        elif spec.kind == "openai":
            got = _running(spec, art, ctx, log)
        else:
            got = _inprocess(spec, art, ctx, slug, log)
    except QuantgateError as exc:  # the engine is not here, or the in-process child failed
        cell["observed"] = {"tried": False, "loads": None, "reason": str(exc)}
        pair["error"] = str(exc)
        return cell, pair
    cell["observed"], measured = got["observed"], got.get("measured")
    loads = cell["observed"].get("loads")
    if loads is not None and sup.status != "maybe":
        cell["agrees"] = loads == (sup.status == "yes")
    if sup.status == "no" and loads is False:
        return cell, None  # refused as the table says: the cell carries the engine's message
    pair.update({k: v for k, v in got.items() if k not in ("observed", "measured", "points")})
    if not pair.get("kernel") and sup.kernel and got["observed"].get("loads"):
        pair["kernel"] = f"{sup.kernel} (table; not in the log)"
    if measured:
        pair.update(measured=True, metrics=measured["metrics"], sweep=measured["sweep"], knee=measured["knee"],
                    slo_rate=measured.get("slo_rate"))
        if measured.get("regression") is not None:
            pair["regression"] = measured["regression"]
        atomic_write_json(ctx["run"].engine_report_file(slug), measured["report"])
    pair["failure_modes"] = sw.failure_modes(
        (measured or {}).get("points", []),
        main={**measured["metrics"], "first_error": measured["first_error"]} if measured else None,
        oom=got.get("oom", False), died=got.get("died", False),
        start_error=None if measured else (cell["observed"].get("reason") or pair.get("error")))
    return cell, pair


def _launched(name: str, spec: EngineSpec, art: Artifact, ctx: dict, slug: str, log) -> dict:
    python, origin = engine_python(spec.kind, spec)
    if not python.is_file():
        raise QuantgateError(f"{spec.kind} is not installed here: {python} (from {origin}) does not exist; "
                             f"see `quantgate engines --list`")
    port, serve_port = free_port(), spec.port or ctx["selection"].serve_port
    # the card keeps the spec as it started (interpreter, --quantization, context made explicit): promote
    # copies it into the manifest and the gateway starts exactly that; the command is for people to read
    resolved = spec.resolved_for(art, str(python)).model_copy(update={"port": serve_port})
    served = Served(art.path, art.name)
    cmd = resolved.command(served, port)
    server = ServerProcess(slug, cmd, port=port, log_path=ctx["run"].engine_log_file(slug),
                           startup_timeout_s=spec.startup_timeout_s)
    out = {"engine_spec": resolved.model_dump(mode="json"),
           "serve_command": {**resolved.command(served, serve_port).to_dict(), "port": serve_port},
           "served_model": art.name}
    try:
        server.start()
    except EngineStartError as exc:
        reading = read_log(spec.kind, _full_log(exc.record.log_path), failed=True)
        log(f"  ✗ did not start: {reading.reason or exc.record.error}")
        return {**out, "launch": exc.record.to_dict(), "error": reading.reason or exc.record.error,
                "observed": {"tried": True, "loads": False, "failure": reading.failure,
                             "reason": reading.reason or exc.record.error, "log": exc.record.log_path},
                "oom": reading.failure == "oom"}
    log(f"  ✓ ready in {server.record.startup_s:.1f} s on {server.base_url}")
    try:
        engine = client(spec.kind, server.base_url, art.name, spec, ctx["workload"].timeout_s)
        measured = asyncio.run(measure(engine, ctx["workload"], ctx["selection"].sweep, ctx["prompts"],
                                       cost=ctx["cost"], alive=server.alive, regression=ctx.get("regression"),
                                       rate_spec=ctx["selection"].rate_search,
                                       log=log))
        died = not server.alive()
    finally:
        rec = server.stop()
    lines = _full_log(rec.log_path)
    reading = read_log(spec.kind, lines, failed=False)
    return {**out, "launch": rec.to_dict(), "kernel": reading.kernel, "measured": measured, "died": died,
            "oom": oom_in(lines), "observed": {"tried": True, "loads": True, "kernel": reading.kernel,
                                               "log": rec.log_path}}


def _running(spec: EngineSpec, art: Artifact, ctx: dict, log) -> dict:
    engine = client(spec.kind, spec.base_url, spec.model or art.name, spec, ctx["workload"].timeout_s)
    measured = asyncio.run(measure(engine, ctx["workload"], ctx["selection"].sweep, ctx["prompts"],
                                   cost=ctx["cost"], regression=ctx.get("regression"),
                                   rate_spec=ctx["selection"].rate_search, log=log))
    ok = measured["metrics"].get("error_rate", 1) < 1
    return {"base_url": spec.base_url, "served_model": spec.model or art.name, "measured": measured if ok else None,
            "error": None if ok else f"every request to {spec.base_url} failed: {measured['first_error']}",
            "observed": {"tried": True, "loads": ok, "kernel": None,
                         "reason": None if ok else measured["first_error"]}}


def _inprocess(spec: EngineSpec, art: Artifact, ctx: dict, slug: str, log) -> dict:
    """The transformers engine, in a child process of its own so its peak memory is the model's."""
    from ..isolate import run_in_child

    job = {"artifact": art.path, "device": spec.device, "threads": spec.threads,
           "workload": ctx["workload"].model_dump(mode="json"),
           "sweep": ctx["selection"].sweep.model_dump(mode="json") if ctx["selection"].sweep else None,
           "slo_rate": rate.model_dump(mode="json") if (rate := ctx["selection"].rate_search) else None,
           "cost": ctx["cost"].model_dump(mode="json") if ctx["cost"] is not None else None,
           "prompt_texts": ctx["prompt_texts"],
           "regression": ([c.model_dump() for c in ctx["regression"][0]], ctx["regression"][1])
           if ctx.get("regression") else None}
    got = run_in_child("quantgate.engines.inproc", job, ctx["run"].engines_tmp)
    if got.get("error"):
        return {"error": got["error"], "observed": {"tried": True, "loads": False, "reason": got["error"][-400:]}}
    r = got["record"]
    log(f"  ✓ loaded in {r['load_s']:.1f} s ({r['kernel']})")
    points = [sw.SweepPoint(**p) for p in r["sweep"]]
    measured = {**r, "points": points}
    return {"launch": {"startup_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"], "in_process": True},
            "kernel": r["kernel"], "measured": measured,
            "observed": {"tried": True, "loads": True, "kernel": r["kernel"]}}


def refresh(cell: dict, pair: dict | None, spec: EngineSpec, art: Artifact) -> tuple[dict, dict | None]:
    """A reused record with today's table and log reading applied (both pure)."""
    sup = expected(spec.kind, art, spec.device, spec.serves)
    cell = {**cell, "artifact": {**art.to_dict(), "label": art.label}, "expected": sup.to_dict()}
    obs = dict(cell.get("observed") or {})
    if obs.get("loads") is False and obs.get("log") and Path(obs["log"]).is_file():
        reading = read_log(spec.kind, _full_log(obs["log"]), failed=True)
        if reading.reason:
            obs.update(reason=reading.reason, failure=reading.failure)
    cell["observed"] = obs
    loads = obs.get("loads")
    cell.pop("agrees", None)
    if loads is not None and sup.status != "maybe":
        cell["agrees"] = loads == (sup.status == "yes")
    if pair is None:
        return cell, None
    if sup.status == "no" and loads is False:
        return cell, None
    pair = {**pair, "artifact": cell["artifact"], "expected": sup.status}
    if not pair.get("measured") and loads is False:
        pair["error"] = obs.get("reason") or pair.get("error")
        pair["failure_modes"] = [f if f["kind"] != "start" else {**f, "detail": pair["error"]}
                                 for f in pair.get("failure_modes", [])]
    return cell, pair
