"""Measure one started engine: the recipe's workload, then the concurrency sweep, through the
one load generator; and the HTTP client each kind of server is measured with."""

from __future__ import annotations

from ..evaluate.clients.openai_http import OpenAIClient
from ..workload import WorkloadSpec
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


async def measure(engine, workload: WorkloadSpec, sweep_spec, prompts, *, cost=None, alive=lambda: True,
                  regression=None, log=print) -> dict:
    """The workload, then the sweep, then the regression set ((cases, max_tokens), graded as the
    evaluation grades it, greedy) on one started engine; returns {report, metrics, sweep, knee,
    regression}: what the engine that would serve answers, not only how fast."""
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
            "sweep": [p.to_dict() for p in points], "knee": k.to_dict() if k else None, "points": points,
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
