"""Measure one started engine: the recipe's workload, then the concurrency sweep, through the
one load generator; and the HTTP client each kind of server is measured with."""

from __future__ import annotations

from ..evaluate.clients.openai_http import OpenAIClient
from ..workload import WorkloadSpec
from . import ratesearch as rs
from . import sweep as sw
from .spec import EngineSpec


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


def probe_workload(w: WorkloadSpec, rate_spec, value: float) -> WorkloadSpec:
    """One probe of the SLO-rate search: the workload's mix, prompts, SLOs and seed at one load.
    On the rate axis the arrivals keep the workload's burst shape (else Poisson) under a high
    in-flight cap, so an overload queues in the server, where TTFT sees it. `quantgate loadtest
    --workload W --arrival A --rate R --concurrency CAP --requests N` sends the same requests."""
    n = rate_spec.requests_at(value)
    base = {**w.model_dump(), "duration_s": None, "requests": n, "warmup_requests": 0, "trace": None,
            "time_scale": 1.0}
    if rate_spec.axis == "concurrency":
        return WorkloadSpec.model_validate({**base, "arrival": "concurrency", "rate": None,
                                            "concurrency": int(value)})
    arrival = w.arrival if w.arrival in ("poisson", "burst") else "poisson"
    return WorkloadSpec.model_validate({**base, "arrival": arrival, "rate": value,
                                        "concurrency": rate_spec.in_flight_cap})


def required_attainment(workload: WorkloadSpec, sweep_spec) -> float:
    """The share of requests that must meet the SLOs: the SLOs' own, else the sweep's, else 0.95."""
    if workload.slo.attainment is not None:
        return workload.slo.attainment
    return sweep_spec.min_attainment if sweep_spec is not None else 0.95


async def search_rate(engine, workload: WorkloadSpec, rate_spec, prompts, need: float, *, cost=None,
                      alive=lambda: True, log=print) -> dict:
    """The bisection's I/O loop (ratesearch.py decides each probe): one load test per probe on the
    started engine; returns the outcome, every probe, and the figures at the highest value that met
    the SLOs (goodput, tokens/s, cost per token there)."""
    from ..evaluate.loadgen import run_load

    values, results, probes = rate_spec.values, [], []
    while (v := rs.next_probe(values, results, rate_spec.max_probes)) is not None and alive():
        wl = probe_workload(workload, rate_spec, v)
        r = (await run_load(engine, wl, prompts)).to_dict()
        m = metrics_of(r, cost)
        p = sw.point_of(wl.concurrency, wl.requests, m, need, first_error(r)).to_dict()
        p.pop("concurrency")
        probes.append({"value": v, **p, "usd_per_1m_output_tokens": m.get("usd_per_1m_output_tokens")})
        results.append((v, p["meets"]))
        log(f"    SLO {rate_spec.axis} {v:g}: attainment {p['attainment'] or 0:.0%}, goodput "
            f"{p['goodput_rps'] or 0:.2f} req/s → {'meets' if p['meets'] else 'misses'}")
    out = rs.outcome(rate_spec.axis, values, results, rate_spec.max_probes).to_dict()
    at = next((p for p in probes if p["value"] == out["max_value"]), None)
    return {**out, "unit": "req/s" if rate_spec.axis == "rate" else "in flight", "attainment_required": need,
            "growth": rate_spec.growth, "goodput_rps": at and at["goodput_rps"],
            "output_tok_s": at and at["output_tok_s"], "usd_per_1m_output_tokens": at and at["usd_per_1m_output_tokens"],
            "requests": at and at["requests"], "probed": probes}


async def measure(engine, workload: WorkloadSpec, sweep_spec, prompts, *, cost=None, alive=lambda: True,
                  regression=None, rate_spec=None, log=print) -> dict:
    """The workload, then the sweep, then the SLO-rate search (when `rate_spec`), then the regression
    set ((cases, max_tokens), graded as the evaluation grades it, greedy) on one started engine;
    returns {report, metrics, sweep, knee, slo_rate, regression}: what the engine that would serve
    answers, not only how fast."""
    from ..evaluate.loadgen import run_load

    await engine.start()
    try:
        report = (await run_load(engine, workload, prompts)).to_dict()
        metrics = metrics_of(report, cost)
        log(f"    workload: P95 E2E {metrics.get('e2e_p95_ms', 0):.0f} ms, {metrics.get('output_tok_s', 0):.1f} tok/s, "
            f"SLO attainment {metrics.get('slo_attainment', 0):.0%}")
        points: list[sw.SweepPoint] = []
        need = required_attainment(workload, sweep_spec)
        if sweep_spec is not None:
            for c, n in sw.plan(sweep_spec.levels, sweep_spec.requests_per_level):
                if not alive():
                    break
                r = (await run_load(engine, sweep_workload(workload, c, n), prompts)).to_dict()
                p = sw.point_of(c, n, metrics_of(r, None), need, first_error(r))
                points.append(p)
                log(f"    sweep c={c}: attainment {p.attainment if p.attainment is not None else 0:.0%}, "
                    f"TTFT p95 {p.ttft_p95_ms or 0:.0f} ms, {p.output_tok_s or 0:.1f} tok/s")
                if sw.should_stop(p, sweep_spec.stop_after_miss):
                    break
        slo_rate = None
        if rate_spec is not None and alive():
            slo_rate = await search_rate(engine, workload, rate_spec, prompts, need, cost=cost, alive=alive, log=log)
        graded = None
        if regression is not None and alive():
            from ..evaluate.regression import run_cases

            res = await run_cases(engine, *regression)
            graded = {k: v for k, v in res.to_dict().items()}
            log(f"    regression set: {res.passed}/{res.total} pass on this engine")
    finally:
        await engine.close()
    k = sw.knee(points)
    return {"report": report, "metrics": metrics, "first_error": first_error(report),
            "sweep": [p.to_dict() for p in points], "knee": k.to_dict() if k else None, "points": points, "slo_rate": slo_rate,
            "regression": graded}



# ------------------------------------------------------------------------------- clients
class LlamaCppClient(OpenAIClient):
    """llama-cpp-python's server ignores `ignore_eos` but honours `min_tokens`, so it is asked for
    the full output length that way (every engine then produces the lengths the workload asks for)."""

    def body(self, req):
        b = super().body(req)
        if req.ignore_eos:
            b.setdefault("min_tokens", req.max_tokens)
        return b


DIALECTS = {"openai": OpenAIClient, "llamacpp": LlamaCppClient}  # engine_spec.Kind.dialect → client


def client(kind: str, base_url: str, model: str, spec: EngineSpec, timeout_s: float) -> OpenAIClient:
    """The HTTP client a server of `kind` is measured with (its kind's dialect)."""
    cls = DIALECTS[spec.info.dialect or "openai"]
    return cls(base_url, model, timeout=timeout_s, extra_body=spec.extra_body)
