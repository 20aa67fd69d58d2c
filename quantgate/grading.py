"""The regression set's grader: a case (prompt + checks) and what makes an answer pass it. Pure.

Layer 1 (it imports only errors and util) so that the evaluation (evaluate/regression.py, the matrix) and the gateway's canary probes
(serve/canary_run.py) grade answers with the same code, and their pass rates compare.
Check types: contains, not_contains, regex, exact, min_len, max_len (characters); `ignore_case`
is on by default for contains/not_contains/exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import QuantgateError
from .util import iter_jsonl


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
