"""What a load test sends: the workload spec (arrivals, long/short mix, prompts, SLOs).

Written by people (a recipe's evaluation.workload, an engine selection, `quantgate loadtest
--workload FILE`), so it lives beside the other specs rather than inside evaluate/."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .documents import Spec


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

    @model_validator(mode="after")
    def _stop_rule(self) -> "WorkloadSpec":
        if self.requests is None and self.duration_s is None:
            raise ValueError("a workload needs 'requests' or 'duration_s'")
        if self.arrival in ("poisson", "burst") and self.rate is None:
            raise ValueError(f"arrival '{self.arrival}' needs 'rate' (requests per second)")
        return self
