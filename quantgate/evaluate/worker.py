"""Child-process entry point: evaluate one candidate (quality, speed, memory, cost) from a job file.

Run by the evaluation stage as `python -m quantgate.evaluate.worker JOB RESULT`. One candidate
per process, so `peak_rss_mb` is that candidate's own peak.
"""

from __future__ import annotations

import asyncio
import sys
import time

from ..isolate import child_main
from ..kernels import dtype_of, emulation
from ..progress import emit
from ..recipe import EvaluationClientSpec, EvaluationSpec
from ..workspace import candidate_record
from . import memory
from .cost import cost_metrics


def _progress(stage):
    """Counts a stage's work items (perplexity batches) for the parent's view and ETA."""

    def counted(items):
        items = list(items)
        for i, item in enumerate(items):
            emit(stage, "progress", done=i, total=len(items))
            yield item
        emit(stage, "progress", done=len(items), total=len(items))

    return counted


TIMINGS: dict[str, float] = {}


class _stage:
    """One evaluation stage: announced to the parent (running/done/failed or skipped when the recipe
    does not ask for it) and its wall time kept in TIMINGS, the record bench/main_job.py reads."""

    def __init__(self, name, active):
        self.name, self.active = name, bool(active)

    def __enter__(self):
        emit(self.name, "running" if self.active else "skipped")
        self.t0 = time.perf_counter()

    def __exit__(self, exc_type, *exc):
        if self.active:
            TIMINGS[self.name] = round(time.perf_counter() - self.t0, 2)
            emit(self.name, "failed" if exc_type else "done")


def quality(engine, spec: EvaluationSpec, name: str) -> tuple[dict, dict]:
    """Perplexity and the regression set on the in-process model; returns (section, flat metrics)."""
    from .quality import perplexity, perplexity_windows
    section, flat = {}, {}
    with _stage("perplexity", spec.perplexity):
        _perplexity(engine, spec, name, section, flat, perplexity, perplexity_windows)
    with _stage("regression", spec.regression):
        _regression(engine, spec, section, flat)
    with _stage("lm_eval", spec.lm_eval and spec.lm_eval.tasks):
        _lm_eval(engine, spec, section, flat)
    return section, flat


def _perplexity(engine, spec, name, section, flat, perplexity, perplexity_windows):
    if spec.perplexity:
        windows = perplexity_windows(engine.tokenizer, spec.perplexity)
        res = perplexity(engine.model, windows, spec.perplexity.batch_size, _progress("perplexity"))
        section["perplexity"] = res.to_dict()
        flat["perplexity"] = res.perplexity


def _regression(engine, spec, section, flat):
    from .regression import load_cases, run_cases

    if spec.regression:
        cases = load_cases(spec.regression.path)
        reg = asyncio.run(run_cases(engine, cases, spec.regression.max_tokens, _progress("regression")))
        section["regression"] = reg.to_dict()
        flat["regression_pass_rate"] = reg.pass_rate


def _lm_eval(engine, spec, section, flat):
    if spec.lm_eval and spec.lm_eval.tasks:
        from .lmeval import run_tasks

        scores = run_tasks(engine.model, engine.tokenizer, spec.lm_eval)
        section["lm_eval"] = scores
        flat.update({f"lm_eval/{task}/{m}": v for task, ms in scores.items() for m, v in ms.items()})


def speed(engine, spec: EvaluationSpec, prompts_texts: list[str]) -> tuple[dict, dict]:
    section, flat = {}, {}
    with _stage("offline", spec.offline and getattr(engine, "model", None) is not None):
        _offline(engine, spec, section, flat)
    with _stage("load_test", spec.workload):
        _load_test(engine, spec, prompts_texts, section, flat)
    return section, flat


def _offline(engine, spec, section, flat):
    if spec.offline and getattr(engine, "model", None) is not None:
        from .clients.transformers_local import offline_timings

        off = offline_timings(engine.model, spec.offline.prompt_tokens, spec.offline.output_tokens, spec.offline.repeats)
        section["offline"] = off.to_dict()
        flat.update(prefill_ms=off.prefill_ms, decode_ms_per_token=off.decode_ms_per_token)


def _load_test(engine, spec, prompts_texts, section, flat):
    if spec.workload:
        from .loadgen import PromptSource

        w = spec.workload
        prompts = (PromptSource.from_jsonl(w.prompts_file, _token_counter(engine)) if w.prompts_file
                   else PromptSource(prompts_texts, _token_counter(engine), origin=f"corpus {w.corpus} (eval split)"))
        report = asyncio.run(_load(engine, w, prompts)).to_dict()
        section["load"] = report
        flat.update(load_metrics(report))
        ok = [r for r in report["records"] if r["outcome"] == "ok"]
        agg = report["aggregates"]
        flat.update(cost_metrics(spec.cost, requests_per_s=agg["request_throughput"],
                                 output_tokens_per_s=agg["output_token_throughput"],
                                 mean_tokens_in=sum(r["tokens_in"] or 0 for r in ok) / max(len(ok), 1),
                                 mean_tokens_out=sum(r["tokens_out"] for r in ok) / max(len(ok), 1)))


async def _load(engine, workload, prompts):
    from .loadgen import run_load

    if getattr(engine, "model", None) is None:
        await engine.start()  # an HTTP engine opens its connection pool here
    try:
        return await run_load(engine, workload, prompts)
    finally:
        if getattr(engine, "model", None) is None:
            await engine.close()


def _token_counter(engine):
    tok = getattr(engine, "tokenizer", None)
    return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])) if tok is not None else None


def load_metrics(report: dict) -> dict:
    """Flatten the load report's aggregates into the metric names gates use (e2e_p95_ms, ...)."""
    agg = report["aggregates"]
    flat = {"load_requests_n": float(len(report.get("records") or []))}  # what every percentile rests on
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for q in ("p50", "p95", "p99"):
            v = (agg.get(metric) or {}).get(q)  # summaries are already in milliseconds
            if v is not None:
                flat[f"{metric}_{q}_ms"] = v
    for k in ("request_throughput", "output_token_throughput", "goodput", "slo_attainment", "error_rate", "timeout_rate"):
        if agg.get(k) is not None:
            flat[{"request_throughput": "throughput_rps", "output_token_throughput": "output_tok_s",
                  "goodput": "goodput_rps"}.get(k, k)] = agg[k]
    return flat


def execute(job: dict) -> dict:
    spec = EvaluationSpec.model_validate(job["evaluation"])
    engine_spec = EvaluationClientSpec.model_validate(job["engine"])
    cand = job["candidate"]
    from .clients.transformers_local import TransformersClient

    t0 = time.perf_counter()
    local = TransformersClient(cand["artifact"], device=job["device"], threads=engine_spec.threads,
                               dtype=job.get("dtype"))
    t_load = time.perf_counter()
    asyncio.run(local.start())
    TIMINGS["model_load"] = round(time.perf_counter() - t_load, 2)
    # what the scores were computed in: the declared dtype and the quantized kernels it ran on
    loaded = {"dtype": dtype_of(local.model), "kernels": local.kernels()}
    if note := emulation(cand["artifact"]):  # W8A8 / FP8 in process: the format's numerics, not its kernels
        loaded["emulated"] = note
    q_section, flat = quality(local, spec, cand["name"])
    speed_engine = local
    if engine_spec.kind == "openai":
        from .clients.openai_http import OpenAIClient

        speed_engine = OpenAIClient(engine_spec.base_url, engine_spec.model or cand["name"])
    s_section, s_flat = speed(speed_engine, spec, job.get("prompt_texts") or [])
    flat.update(s_flat)
    mem = {"weights_bytes": memory.weights_bytes(cand["artifact"]), **memory.process_peak()}
    flat.update(weights_mb=mem["weights_bytes"] / 1e6, peak_rss_mb=mem["peak_rss_mb"])
    if "peak_cuda_mb" in mem:
        flat["peak_cuda_mb"] = mem["peak_cuda_mb"]
    return {
        "name": cand["name"], "method": cand["method"], "artifact": cand["artifact"],
        "engine": engine_spec.model_dump(mode="json"), "device": job["device"],
        **loaded,
        "quality": q_section, "speed": s_section, "memory": mem, "metrics": flat,
        "eval_key": job["eval_key"], "wall_s": round(time.perf_counter() - t0, 2), "timings_s": dict(TIMINGS),
        **_made_as(cand["artifact"]),
    }


def _made_as(artifact: str) -> dict:
    """What the record repeats from the candidate's own record: a mixed candidate's bit map."""
    rec = candidate_record(artifact) or {}
    return {"mixed": rec["mixed"]} if rec.get("mixed") else {}


if __name__ == "__main__":
    sys.exit(child_main(execute, sys.argv[1:]))
