"""Run the engine matrix for one recipe: every artifact × engine the selection names — expected
support from the table, the observed start (kernel or the engine's own failure message), and for
each pair that serves, the recipe's workload and a concurrency sweep through the one load
generator. Each pair's record is written as soon as it is measured (engines/pairs/*.json, reused
when nothing it depends on changed), then the card (engines/card.json and card.md).

Launched servers are always stopped, whatever happens to the measurement.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import QuantgateError
from ..workload import WorkloadSpec
from ..formats import Artifact, expected
from ..recipe import stable_hash
from ..util import atomic_write_json
from ..workspace import RunFolder, read_json
from . import sweep as sw
from .card import build_card, render_markdown
from .commands import command_for
from .launch import EngineStartError, ServerProcess, free_port
from .logs import oom_in, read_log
from .spec import (
    LAUNCHED,
    EngineSelectionSpec,
    LaunchSpec,
    engine_python,
    gguf_converter,
)


# ------------------------------------------------------------------------------ measuring
def metrics_of(report: dict, cost) -> dict:
    """Flat metrics of a load report: latency percentiles, rates, and cost (as the evaluation does)."""
    from ..evaluate.cost import cost_metrics
    from ..evaluate.worker import load_metrics

    flat = load_metrics(report)
    ok = [r for r in report["records"] if r["outcome"] == "ok"]
    agg = report["aggregates"]
    if cost is not None:
        flat.update(cost_metrics(cost, requests_per_s=agg["request_throughput"],
                                 output_tokens_per_s=agg["output_token_throughput"],
                                 mean_tokens_in=sum(r["tokens_in"] or 0 for r in ok) / max(len(ok), 1),
                                 mean_tokens_out=sum(r["tokens_out"] for r in ok) / max(len(ok), 1)))
    flat["tokens_out_mean"] = agg.get("tokens_out_mean")
    return flat


def first_error(report: dict) -> str | None:
    return next((r["error"] for r in report["records"] if r.get("error")), None)


def sweep_workload(w: WorkloadSpec, concurrency: int, requests: int) -> WorkloadSpec:
    return WorkloadSpec.model_validate({**w.model_dump(), "arrival": "concurrency", "rate": None, "duration_s": None,
                                        "concurrency": concurrency, "requests": requests, "warmup_requests": 0})


async def measure(engine, workload: WorkloadSpec, sweep_spec, prompts, *, cost=None, alive=lambda: True,
                  log=print) -> dict:
    """The workload, then the sweep, on one started-by-us engine; returns {report, metrics, sweep, knee}."""
    from ..evaluate.loadgen import run_load

    await engine.start()
    try:
        report = (await run_load(engine, workload, prompts)).to_dict()
        metrics = metrics_of(report, cost)
        log(f"    workload: P95 E2E {metrics.get('e2e_p95_ms', 0):.0f} ms, {metrics.get('output_tok_s', 0):.1f} tok/s, "
            f"SLO attainment {metrics.get('slo_attainment', 0):.0%}")
        points: list[sw.SweepPoint] = []
        if sweep_spec is not None:
            for c, n in sw.plan(sweep_spec.levels, sweep_spec.requests_per_level):
                if not alive():
                    break
                r = (await run_load(engine, sweep_workload(workload, c, n), prompts)).to_dict()
                p = sw.point_of(c, n, metrics_of(r, None), sweep_spec.min_attainment, first_error(r))
                points.append(p)
                log(f"    sweep c={c}: attainment {p.attainment if p.attainment is not None else 0:.0%}, "
                    f"TTFT p95 {p.ttft_p95_ms or 0:.0f} ms, {p.output_tok_s or 0:.1f} tok/s")
                if sw.should_stop(p, sweep_spec.stop_after_miss):
                    break
    finally:
        await engine.close()
    k = sw.knee(points)
    return {"report": report, "metrics": metrics, "first_error": first_error(report),
            "sweep": [p.to_dict() for p in points], "knee": k.to_dict() if k else None, "points": points}


# ------------------------------------------------------------------------------- clients
def client(kind: str, base_url: str, model: str, spec: LaunchSpec, timeout_s: float):
    """The HTTP client for a server. For llama-cpp-python's server, two adaptations:
    it ignores `ignore_eos` but honours `min_tokens`, so it is asked for the full output length
    that way (every engine then produces the lengths the workload asks for); and it answers
    400 to an `X-Request-Id` that is not a UUID (starlette-context validates it), so the id
    OpenAIEngine sends is replaced by a fresh UUID per request."""
    import uuid

    from ..evaluate.engines.openai_http import OpenAIEngine

    eng = OpenAIEngine(base_url, model, timeout=timeout_s, extra_body=spec.extra_body)
    if kind == "llamacpp":
        plain_body, plain_request = eng.body, eng._request

        def body(req):
            b = plain_body(req)
            if req.ignore_eos:
                b.setdefault("min_tokens", req.max_tokens)
            return b

        def request(method, url, **kw):
            if "X-Request-Id" in (kw.get("headers") or {}):
                kw["headers"] = {**kw["headers"], "X-Request-Id": str(uuid.uuid4())}
            return plain_request(method, url, **kw)

        eng.body, eng._request = body, request  # type: ignore[method-assign]
    return eng


# ------------------------------------------------------------------------------- one pair
def _full_log(path: str) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []


def run_pair(name: str, spec: LaunchSpec, art: Artifact, ctx: dict, log=print) -> tuple[dict, dict | None]:
    """(matrix cell, pair record or None). The pair record exists for every pair the table does
    not rule out; a pair that failed to start carries the engine's message and is not measured."""
    sup = expected(spec.kind, art, spec.device, spec.serves)
    cell = {"artifact": {**art.to_dict(), "label": art.label}, "engine": name, "engine_kind": spec.kind,
            "expected": sup.to_dict(), "observed": {"tried": False, "loads": None}}
    if spec.kind == "openai" and spec.serves and spec.serves != art.name:
        return cell, None
    if sup.status == "no" and (not ctx["selection"].probe_unsupported or spec.kind not in LAUNCHED):
        return cell, None
    pair = {"engine": name, "engine_kind": spec.kind, "artifact": cell["artifact"], "measured": False,
            "expected": sup.status, "threads": spec.threads, "device": spec.device}
    slug = f"{name}--{art.name}"
    log(f"→ {art.name} on {name} (table: {sup.status}{', ' + sup.kernel if sup.kernel else ''})")
    try:
        if spec.kind in LAUNCHED:
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
        pair.update(measured=True, metrics=measured["metrics"], sweep=measured["sweep"], knee=measured["knee"])
        atomic_write_json(ctx["run"].engine_report_file(slug), measured["report"])
    pair["failure_modes"] = sw.failure_modes(
        (measured or {}).get("points", []),
        main={**measured["metrics"], "first_error": measured["first_error"]} if measured else None,
        oom=got.get("oom", False), died=got.get("died", False),
        start_error=None if measured else (cell["observed"].get("reason") or pair.get("error")))
    return cell, pair


def _launched(name: str, spec: LaunchSpec, art: Artifact, ctx: dict, slug: str, log) -> dict:
    python, origin = engine_python(spec.kind, spec)
    if not python.is_file():
        raise QuantgateError(f"{spec.kind} is not installed here: {python} (from {origin}) does not exist; "
                             f"see `quantgate engines --list`")
    port = free_port()
    cmd = command_for(spec.kind, str(python), art, spec, port)
    serve = command_for(spec.kind, str(python), art, spec, spec.port or ctx["selection"].serve_port)
    server = ServerProcess(slug, cmd, port=port, log_path=ctx["run"].engine_log_file(slug),
                           startup_timeout_s=spec.startup_timeout_s)
    out = {"serve_command": {**serve.to_dict(), "port": spec.port or ctx["selection"].serve_port},
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
                                       cost=ctx["cost"], alive=server.alive, log=log))
        died = not server.alive()
    finally:
        rec = server.stop()
    lines = _full_log(rec.log_path)
    reading = read_log(spec.kind, lines, failed=False)
    return {**out, "launch": rec.to_dict(), "kernel": reading.kernel, "measured": measured, "died": died,
            "oom": oom_in(lines), "observed": {"tried": True, "loads": True, "kernel": reading.kernel,
                                               "log": rec.log_path}}


def _running(spec: LaunchSpec, art: Artifact, ctx: dict, log) -> dict:
    engine = client(spec.kind, spec.base_url, spec.model or art.name, spec, ctx["workload"].timeout_s)
    measured = asyncio.run(measure(engine, ctx["workload"], ctx["selection"].sweep, ctx["prompts"],
                                   cost=ctx["cost"], log=log))
    ok = measured["metrics"].get("error_rate", 1) < 1
    return {"base_url": spec.base_url, "served_model": spec.model or art.name, "measured": measured if ok else None,
            "error": None if ok else f"every request to {spec.base_url} failed: {measured['first_error']}",
            "observed": {"tried": True, "loads": ok, "kernel": None,
                         "reason": None if ok else measured["first_error"]}}


def _inprocess(spec: LaunchSpec, art: Artifact, ctx: dict, slug: str, log) -> dict:
    """The transformers engine, in a child process of its own so its peak memory is the model's."""
    from ..isolate import run_in_child

    job = {"artifact": art.path, "device": spec.device, "threads": spec.threads,
           "workload": ctx["workload"].model_dump(mode="json"),
           "sweep": ctx["selection"].sweep.model_dump(mode="json") if ctx["selection"].sweep else None,
           "cost": ctx["cost"].model_dump(mode="json") if ctx["cost"] is not None else None,
           "prompt_texts": ctx["prompt_texts"]}
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


def refresh(cell: dict, pair: dict | None, spec: LaunchSpec, art: Artifact) -> tuple[dict, dict | None]:
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


# ---------------------------------------------------------------------------- the matrix
def machine(device: str) -> dict:
    """The constraints section: CPU, cores, memory, GPU (nvidia-smi), network."""
    import shutil
    import subprocess

    cpu = "?"
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().replace("\n", "; ") or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device, "cpu_model": cpu, "cores": cores, "memory_gb": mem, "gpu": gpu,
            "network": "loopback; client and server on one machine"}


def _load_range(pairs: list[dict]) -> str:
    vals = [float(x) for p in pairs if p.get("load_avg") for x in p["load_avg"].split(" → ")]
    return f"{min(vals):.1f}–{max(vals):.1f} over the pairs' measurements" if vals else "not recorded"


def quality_verdicts(run: RunFolder) -> dict[str, dict]:
    """{candidate: {passed, failed_gates}} from the run's compare.json, if the run was compared."""
    comp = run.comparison(required=False)
    if comp is None:
        return {}
    return {c["name"]: {"passed": c.get("passed"), "failed_gates": [g["metric"] for g in c.get("gates", [])
                                                                    if not g.get("passed")]}
            for c in comp.get("candidates", [])}


def token_counter(recipe, log=print):
    """Count prompt tokens with the recipe model's tokenizer (falls back to ~4 chars/token)."""
    try:
        from transformers import AutoTokenizer

        from ..models import resolve

        tok = AutoTokenizer.from_pretrained(resolve(recipe.model.ref, revision=recipe.model.revision, progress=log))
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # no tokenizer: the load generator's estimate still works
        log(f"prompt sizes use the ~4 chars/token estimate ({type(exc).__name__}: {exc})")
        return None


def pair_key(name: str, spec: LaunchSpec, art: Artifact, workload: WorkloadSpec, selection: EngineSelectionSpec) -> str:
    """What a pair's measurement depends on: the engine settings, the artifact's identity (name,
    path, format, modification time), the workload and sweep. Not the table or the log reading:
    those are re-applied to a reused record (refresh), so a better rule needs no re-measurement."""
    st = Path(art.path).stat() if Path(art.path).exists() else None
    return stable_hash({"engine": name, "spec": spec.model_dump(mode="json"),
                        "artifact": {"name": art.name, "path": art.path, "format": art.format},
                        "mtime": st.st_mtime if st else None, "workload": workload.model_dump(mode="json"),
                        "sweep": selection.sweep.model_dump(mode="json") if selection.sweep else None,
                        "probe": selection.probe_unsupported, "serve_port": selection.serve_port})


def run_matrix(recipe, ws, selection: EngineSelectionSpec, *, engines: list[str] | None = None,
               candidates: list[str] | None = None, force: bool = False, command: str = "quantgate engines",
               log=print) -> dict:
    """Measure the matrix and write engines/card.{json,md} in the run folder; returns the card."""
    from ..evaluate.loadgen import PromptSource
    from ..evaluate.prompts import prompt_texts
    from .artifacts import candidate_artifacts, extra_artifacts

    unknown = set(engines or ()) - set(selection.engines)
    if unknown:
        raise QuantgateError(f"no engine(s) {', '.join(sorted(unknown))} in the selection; "
                             f"engines: {', '.join(selection.engines)}")
    run = ws.run(recipe)
    workload = selection.workload or recipe.evaluation.workload or WorkloadSpec()
    arts, missing = candidate_artifacts(recipe, ws, selection.candidates)
    sources = {a.name: a for a in arts}  # what extras convert from, whatever --only says
    extra = selection.extra
    if candidates:  # --only: candidates and extras by name
        known = {c.name for c in recipe.candidates} | {x.name for x in extra}
        if set(candidates) - known:
            raise QuantgateError(f"no candidate(s) or extra(s) {', '.join(sorted(set(candidates) - known))}; "
                                 f"known: {', '.join(sorted(known))}")
        arts = [a for a in arts if a.name in candidates]
        missing = {k: v for k, v in missing.items() if k in candidates}
        extra = [x for x in extra if x.name in candidates]
    extras, extra_missing = extra_artifacts(selection.model_copy(update={"extra": extra}), recipe, ws, sources,
                                            converter=gguf_converter(selection), log=log)
    missing.update(extra_missing)
    for n, why in missing.items():
        log(f"! {n}: {why}")
    texts, _ = prompt_texts(workload, warn=log)
    ctx = {"selection": selection, "workload": workload, "run": run, "cost": recipe.evaluation.cost,
           "prompts": PromptSource(texts, token_counter(recipe, log)), "prompt_texts": texts}
    quality = quality_verdicts(run)
    cells, pairs = [], []
    for name, spec in selection.engines.items():
        if engines and name not in engines:
            continue
        for art in arts + extras:
            key = pair_key(name, spec, art, workload, selection)
            cached = run.engine_pair_file(name, art.name)
            saved = None if force else read_json(cached)
            if saved is not None and saved.get("key") == key:
                log(f"✓ {art.name} on {name}: measured before with these settings")
                cell, pair = refresh(saved["cell"], saved["pair"], spec, art)
            else:
                t0, l0 = time.time(), os.getloadavg()[0]
                cell, pair = run_pair(name, spec, art, ctx, log)
                if pair is not None:
                    pair["wall_s"] = round(time.time() - t0, 1)
                    pair["load_avg"] = f"{l0:.1f} → {os.getloadavg()[0]:.1f}"
                atomic_write_json(cached, {"key": key, "cell": cell, "pair": pair})
            if pair is not None:
                pair["quality"] = quality.get(art.name, {"passed": None})
                pairs.append(pair)
            cells.append(cell)
    device = "cuda" if any(s.device == "cuda" for s in selection.engines.values()) else "cpu"
    context = {
        "recipe": recipe.name, "recipe_hash": recipe.recipe_hash, "goal": selection.goal,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "workload": workload.model_dump(mode="json"),
        "sweep": selection.sweep.model_dump(mode="json") if selection.sweep else None,
        "prompts": f"{'file ' + workload.prompts_file if workload.prompts_file else 'corpus ' + workload.corpus} "
                   f"(eval split), counted with the model's tokenizer",
        "constraints": {**machine(device), "load_avg": _load_range(pairs)},
        "rollback_to": recipe.card.rollback_to or (recipe.baseline.name if recipe.baseline else None),
        "missing": missing,
        "engines": {n: s.model_dump(mode="json") for n, s in selection.engines.items()},
    }
    card = build_card(context, cells, pairs)
    run.write_engine_card(card, render_markdown(card))
    return card
