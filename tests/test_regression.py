import json

import pytest

from quantgate.errors import QuantgateError
from quantgate.evaluate.regression import Case, check, flips, grade, load_cases, summarize
from quantgate.evaluate.regression import Check as C


def test_checks():
    assert check("The capital is Paris.", C(type="contains", value="paris"))
    assert not check("The capital is Paris.", C(type="contains", value="paris", ignore_case=False))
    assert check("It is 4.", C(type="regex", value=r"\b4\b")) and not check("It is 44.", C(type="regex", value=r"\b4\b"))
    assert check(" yes ", C(type="exact", value="Yes"))
    assert check("abc", C(type="max_len", value=3)) and not check("abcd", C(type="max_len", value=3))
    assert check("abcd", C(type="min_len", value=4)) and check("no", C(type="not_contains", value="yes"))


def test_grade_lists_failed_checks_and_summary():
    case = Case(id="a", prompt="p", checks=[C(type="contains", value="x"), C(type="max_len", value=2)])
    r = grade(case, "xyz")
    assert not r.passed and r.failed_checks == ["max_len 2"]
    s = summarize([r, grade(case, "x")])
    assert (s.passed, s.total, s.pass_rate) == (1, 2, 0.5)


def test_flips_against_baseline():
    base = {"cases": [{"id": "a", "passed": True}, {"id": "b", "passed": False}, {"id": "c", "passed": True}]}
    cand = {"cases": [{"id": "a", "passed": False}, {"id": "b", "passed": True}, {"id": "c", "passed": True}]}
    assert flips(cand, base) == {"broke": ["a"], "fixed": ["b"]}


def test_load_cases_errors_name_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "p", "checks": [{"type": "contains", "value": "x"}]}) + "\n"
                 + json.dumps({"id": "b", "prompt": "p", "checks": [{"type": "containz", "value": "x"}]}) + "\n")
    with pytest.raises(QuantgateError, match=r"r.jsonl:2: checks.0.type"):
        load_cases(f)


def test_shipped_regression_set_loads():
    from pathlib import Path

    cases = load_cases(Path(__file__).resolve().parents[1] / "recipes/regression/smollm2-basics.jsonl")
    assert len(cases) >= 10 and len({c.id for c in cases}) == len(cases)


@pytest.mark.parametrize("output, ok", [
    ("Water freezes at 0°C.", True), ("0 degrees Celsius", True), ("At zero degrees.", True),
    ("The freezing point of water is -18.0°C.", False),   # the baseline's answer, once counted right by \b0\b
    ("It freezes at 0.0 °C", True), ("It freezes at 10°C.", False), ("About 0.5 degrees", False)])
def test_the_freezing_point_case_wants_zero_not_a_number_with_a_zero_in_it(output, ok):
    from pathlib import Path

    cases = load_cases(Path(__file__).resolve().parents[1] / "recipes/regression/smollm2-basics.jsonl")
    case = next(c for c in cases if c.id == "freezing-point")
    assert all(check(output, c) for c in case.checks) is ok
