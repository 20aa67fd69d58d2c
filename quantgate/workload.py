"""What a load test sends: the workload spec (arrivals, long/short mix, prompts, SLOs).

Written by people (a recipe's evaluation.workload, an engine selection, `quantgate loadtest
--workload FILE`), so it lives beside the other specs rather than inside evaluate/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .documents import Spec, omitted_while_unset
from .errors import QuantgateError

TRACE_HEADER = "quantgate_trace"  # the key of a trace file's header line (serve/trace.py writes them)
TRACE_VERSION = 1


class LengthClass(Spec):
    """One kind of request in the mix: how often, how long the prompt, how many tokens out."""

    name: str
    weight: float = Field(1.0, gt=0)
    prompt_tokens: int = Field(..., ge=1)
    output_tokens: int = Field(..., ge=1)


class SLOSpec(Spec):
    """A request counts toward goodput only if it meets every target given here."""

    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2e_ms: float | None = Field(None, gt=0)
    attainment: float | None = Field(
        None, gt=0, le=1, description="the share of requests that must meet them for the load to count as "
                                      "within the SLOs (default: the engine sweep's min_attainment, 0.95)")

    _stable_dump = omitted_while_unset("attainment")  # recipe hashes of SLOs that do not set it

    @property
    def targets(self) -> dict[str, float]:
        """The latency targets given (ttft_ms, tpot_ms, e2e_ms), without the attainment."""
        return {k: v for k, v in (("ttft_ms", self.ttft_ms), ("tpot_ms", self.tpot_ms), ("e2e_ms", self.e2e_ms))
                if v is not None}


def _default_mix() -> list[LengthClass]:
    return [
        LengthClass(name="short", weight=0.7, prompt_tokens=64, output_tokens=32),
        LengthClass(name="long", weight=0.3, prompt_tokens=512, output_tokens=128),
    ]


class WorkloadSpec(Spec):
    requests: int | None = Field(32, ge=1, description="number of measured requests")
    duration_s: float | None = Field(None, gt=0, description="or: send for this long")
    arrival: Literal["concurrency", "poisson", "burst"] = "concurrency"
    concurrency: int = Field(4, ge=1, description="in-flight cap (fixed concurrency; also a cap for rates)")
    rate: float | None = Field(None, gt=0, description="requests/s for poisson and burst arrivals")
    burstiness: float = Field(1.0, gt=0, description="gamma shape of inter-arrival gaps: 1 = Poisson, <1 = bursty")
    mix: list[LengthClass] = Field(default_factory=_default_mix, min_length=1)
    corpus: str = Field("britannica", description="bundled corpus whose eval split gives prompt text")
    prompts_file: str | None = Field(None, description="JSONL with a 'prompt' field (overrides corpus)")
    warmup_requests: int = Field(1, ge=0)
    timeout_s: float = Field(120.0, gt=0)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    seed: int = 0
    trace: str | None = Field(None, description="replay a gateway trace (serving.trace) instead of a synthetic mix")
    time_scale: float = Field(1.0, ge=0, description="trace arrival times are multiplied by this (0: all at once)")

    _stable_dump = omitted_while_unset("trace", "time_scale")  # recipe hashes of workloads without a trace

    @model_validator(mode="after")
    def _stop_rule(self) -> "WorkloadSpec":
        if self.requests is None and self.duration_s is None:
            raise ValueError("a workload needs 'requests' or 'duration_s'")
        if self.arrival in ("poisson", "burst") and self.rate is None:
            raise ValueError(f"arrival '{self.arrival}' needs 'rate' (requests per second)")
        return self


def trace_files(path: str | Path) -> list[Path]:
    """The files of a trace, oldest first: FILE.K … FILE.1 (the gateway's rotated files) then FILE.
    Named by a rotated file (FILE.2), or a trace not rotated, just that file."""
    p = Path(path).expanduser()
    older = []
    while (p.parent / f"{p.name}.{len(older) + 1}").is_file():
        older.append(p.parent / f"{p.name}.{len(older) + 1}")
    return [*reversed(older), p]


def chain_segments(segments: list[list[dict]]) -> list[dict]:
    """One replay from several files' records (oldest first): each file's arrivals count from its own
    first request, so each continues from the previous file's last arrival. The time between two
    files (a rotation, or a gateway restarted hours later) is not replayed as idle time."""
    out, offset = [], 0.0
    for seg in segments:
        if not seg:
            continue
        t0 = seg[0]["t"]
        out += [{**r, "t": r["t"] - t0 + offset} for r in seg]
        offset = out[-1]["t"]
    return out


def read_trace(path: str | Path) -> list[dict]:
    """The request records of a trace (FILE and the files it was rotated into, see `trace_files`),
    in arrival order, with a clear error naming the file and line that is bad."""
    files = trace_files(path)
    out = chain_segments([_read_trace_file(f) for f in files])
    if not out:
        raise QuantgateError(f"trace {files[-1]}: no requests in it" + (f" or the {len(files) - 1} file(s) rotated "
                                                                         "from it" if len(files) > 1 else ""))
    return out


def _read_trace_file(p: Path) -> list[dict]:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantgateError(f"trace {p}: cannot read it ({exc.strerror or exc}); record one with "
                             "serving.trace in the manifest") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            raise QuantgateError(f"trace {p}: line {n} is not JSON; a trace has one JSON object a line") from None
        if not isinstance(rec, dict):
            raise QuantgateError(f"trace {p}: line {n} is not a JSON object")
        if TRACE_HEADER in rec:
            continue
        try:
            t, pin, pout = float(rec["t"]), int(rec["prompt_tokens"]), int(rec["output_tokens"])
            mx = rec.get("max_tokens")
            mx = int(mx) if mx is not None else None
        except (KeyError, TypeError, ValueError):
            raise QuantgateError(f"trace {p}: line {n} needs numeric 't', 'prompt_tokens' and 'output_tokens'") from None
        if not math.isfinite(t) or t < 0 or pin < 0 or pout < 0:
            raise QuantgateError(f"trace {p}: line {n} has a negative time or token count")
        out.append({"t": t, "prompt_tokens": pin, "output_tokens": pout, "max_tokens": mx})
    return sorted(out, key=lambda r: r["t"])
