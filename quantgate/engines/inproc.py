"""Child-process entry point: the in-process transformers engine on one artifact, measured with
the same workload and sweep as the servers. Run by matrix.py as
`python -m quantgate.engines.inproc JOB RESULT`, one artifact per process, so the peak memory
(VmHWM) is that model's own plus the interpreter's."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path


def _kernel(model) -> str:
    """Class names of the quantized linear layers the loader put in (the kernel it chose)."""
    names = sorted({type(m).__name__ for m in model.modules()
                    if hasattr(m, "qweight") or "QuantLinear" in type(m).__name__})
    return ", ".join(names) if names else "torch Linear (dense)"


def _hwm_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def execute(job: dict) -> dict:
    from ..evaluate.clients.transformers_local import TransformersClient
    from ..evaluate.loadgen import PromptSource
    from ..evaluate.prompts import FALLBACK_TEXT
    from ..recipe import CostSpec
    from ..workload import WorkloadSpec
    from .measure import measure
    from .spec import SLORateSpec, SweepSpec

    engine = TransformersClient(job["artifact"], device=job["device"], threads=job.get("threads"))
    t0 = time.perf_counter()
    asyncio.run(engine.start())
    load_s = round(time.perf_counter() - t0, 3)
    tok = engine.tokenizer
    prompts = PromptSource(job["prompt_texts"] or FALLBACK_TEXT,
                           lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    kernel = _kernel(engine.model)
    sweep = SweepSpec.model_validate(job["sweep"]) if job.get("sweep") else None
    rate_spec = SLORateSpec.model_validate(job["slo_rate"]) if job.get("slo_rate") else None
    cost = CostSpec.model_validate(job["cost"]) if job.get("cost") else None

    regression = None
    if job.get("regression"):
        from ..evaluate.regression import Case

        cases, max_tokens = job["regression"]
        regression = ([Case.model_validate(c) for c in cases], max_tokens)

    async def go():
        # the engine is already loaded: measure() calls start() (a reload) — avoid it
        engine.start = _noop  # type: ignore[method-assign]
        return await measure(engine, WorkloadSpec.model_validate(job["workload"]), sweep, prompts, cost=cost,
                             regression=regression, rate_spec=rate_spec)

    got = asyncio.run(go())
    got.pop("points", None)
    return {**got, "load_s": load_s, "kernel": kernel, "peak_rss_mb": _hwm_mb()}


async def _noop() -> None:
    return None


if __name__ == "__main__":
    from ..isolate import child_main

    sys.exit(child_main(execute, sys.argv[1:]))
