"""The regression set: the team's own business cases as JSONL prompts with checks.

One line per case: {"id": "...", "prompt": "...", "checks": [{"type": "contains", "value": "Paris"}]}
Check types: contains, not_contains, regex, exact, min_len, max_len (characters); `ignore_case`
is on by default for contains/not_contains/exact. Checking is pure; generation is the engine's job.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import QuantgateError
from ..util import iter_jsonl


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["contains", "not_contains", "regex", "exact", "min_len", "max_len"]
    value: str | int
    ignore_case: bool = True


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    prompt: str
    checks: list[Check] = Field(..., min_length=1)
    system: str | None = None

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [{"role": "user", "content": self.prompt}]


def load_cases(path: str | Path) -> list[Case]:
    p = Path(path)
    if not p.is_file():
        raise QuantgateError(f"evaluation.regression.path: '{p}' does not exist")
    cases, seen = [], set()
    for i, row in iter_jsonl(p):
        try:
            case = Case.model_validate(row)
        except ValidationError as exc:
            e = exc.errors()[0]
            raise QuantgateError(f"{p}:{i}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        if case.id in seen:
            raise QuantgateError(f"{p}:{i}: case id '{case.id}' is used twice")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise QuantgateError(f"{p}: no cases")
    return cases


def check(output: str, c: Check) -> bool:
    text, val = (output.lower(), str(c.value).lower()) if c.ignore_case else (output, str(c.value))
    if c.type == "contains":
        return val in text
    if c.type == "not_contains":
        return val not in text
    if c.type == "exact":
        return text.strip() == val.strip()
    if c.type == "regex":
        return re.search(str(c.value), output, re.IGNORECASE if c.ignore_case else 0) is not None
    if c.type == "min_len":
        return len(output.strip()) >= int(c.value)
    return len(output.strip()) <= int(c.value)


@dataclass
class CaseResult:
    id: str
    passed: bool
    failed_checks: list[str]
    output: str


def grade(case: Case, output: str) -> CaseResult:
    failed = [f"{c.type} {c.value!r}" for c in case.checks if not check(output, c)]
    return CaseResult(case.id, not failed, failed, output)


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
