"""The regression set: the team's own business cases as JSONL prompts with checks.

One line per case: {"id": "...", "prompt": "...", "checks": [{"type": "contains", "value": "Paris"}]}
The cases, their reader and their grader are quantgate.grading (layer 1: the gateway's canary probes
grade with the same code); this module runs the set through a client and summarises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..grading import Case, CaseResult, Check, check, grade, load_cases  # noqa: F401 - re-exported for the stages


@dataclass
class RegressionResult:
    pass_rate: float
    passed: int
    total: int
    cases: list[CaseResult]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: list[CaseResult]) -> RegressionResult:
    passed = sum(r.passed for r in results)
    return RegressionResult(passed / len(results) if results else 0.0, passed, len(results), results)


def flips(candidate: dict, baseline: dict) -> dict:
    """Cases whose verdict differs from the baseline's: {"broke": [...], "fixed": [...]}."""
    base = {c["id"]: c["passed"] for c in baseline.get("cases", [])}
    mine = {c["id"]: c["passed"] for c in candidate.get("cases", [])}
    return {
        "broke": sorted(i for i, ok in mine.items() if base.get(i) and not ok),
        "fixed": sorted(i for i, ok in mine.items() if ok and base.get(i) is False),
    }


async def answer(client, case: Case, max_tokens: int) -> str:
    """The client's greedy answer to one case (any evaluate.clients Client: in process or over HTTP)."""
    from .clients.base import GenerationRequest

    parts = []
    async for chunk in client.stream(GenerationRequest(f"regression-{case.id}", case.messages(), max_tokens,
                                                       ignore_eos=False, greedy=True)):
        parts.append(chunk.text)
    return "".join(parts)


async def run_cases(client, cases: list[Case], max_tokens: int, progress=lambda xs: xs) -> RegressionResult:
    """Every case through `client`, graded: the evaluation's in-process model and a serving engine
    are graded by the same code, so their pass rates compare."""
    return summarize([grade(c, await answer(client, c, max_tokens)) for c in progress(cases)])
