"""The trace marks which deployment served each request while a canary runs (serve/trace.py): the arm the
caller was routed to and the key of the deployment that answered. A real gateway on loopback, real HTTP,
mock providers; the trace file is flushed on request, so nothing waits on a timer."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import aiohttp
import pytest

from gwkit import mock
from quantgate.serve.trace import event, line

pytestmark = pytest.mark.timeout(120)


def held_canary(challenger: dict, trace_path, weight: float = 50, **canary) -> dict:
    """A canary that holds at `weight` for the whole test (its steps need more requests than it gets)."""
    c = {"challenger": challenger, "steps": [weight, 100], "step_started": datetime.now(timezone.utc).isoformat(),
         "min_requests": 100_000, "min_fail_requests": 100_000, "min_seconds": 0, "eval_interval_s": 0.05, **canary}
    return {"schema_version": 2, "active": mock("stable", reply_tokens=4),
            "serving": {"default_budget_ms": 3000, "max_budget_ms": 10000, "max_concurrency": 64, "anonymous": True,
                        "reload_interval_s": 0.05, "cache": {"enabled": False},
                        "trace": {"path": str(trace_path)}},
            "canary": c}


def send_twice_each(srv, users: int) -> list[int]:
    """Each user asks twice, one request at a time, so the trace's order is the sending order."""
    async def go():
        statuses = []
        async with aiohttp.ClientSession() as s:
            for i in range(users):
                for _ in range(2):
                    async with s.post(srv.url + "/chat", json={"user_id": f"u{i}", "prompt": f"q {i}"}) as r:
                        await r.read()
                        statuses.append(r.status)
        return statuses
    return asyncio.run(go())


def records(srv, path) -> list[dict]:
    srv.call(srv.gateway.trace.flush())
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r for r in rows if "outcome" in r]  # the header line holds the file's start


def test_a_trace_line_carries_the_arm_and_the_deployment():
    ev = event(100.0, "acme", "chat", False, "ok", tokens_in=3, tokens_out=4, max_tokens=8, budget_ms=1000,
               arm="canary", deployment="good@2#abc")
    rec = json.loads(line(ev, 99.0, b"salt", False))
    assert (rec["arm"], rec["deployment"]) == ("canary", "good@2#abc")
    plain = json.loads(line(event(100.0, None, "chat", False, "4xx:bad", tokens_in=0, tokens_out=0, max_tokens=None,
                                  budget_ms=None), 99.0, b"salt", False))
    assert (plain["arm"], plain["deployment"]) == ("stable", None)


def test_every_record_says_which_arm_and_deployment_served_it(serve, tmp_path):
    path = tmp_path / "trace.jsonl"
    srv = serve(held_canary(mock("good", reply_tokens=4), path))
    assert all(s == 200 for s in send_twice_each(srv, 40))
    rows = records(srv, path)
    assert len(rows) == 80
    by_arm = {(r["arm"], r["deployment"]) for r in rows}
    assert by_arm == {("stable", "stable@1"), ("canary", "good@1")}, by_arm
    for a, b in zip(rows[::2], rows[1::2]):  # sticky: a user's two requests are on one arm
        assert a["arm"] == b["arm"]
    n_canary = sum(r["arm"] == "canary" for r in rows)
    assert 10 <= n_canary <= 70  # about half at 50%: both arms are really in the file


def test_a_canary_attempt_answered_by_the_stable_says_so(serve, tmp_path):
    # every canary attempt fails, and the stable (the canary arm's fallback) answers it: the record keeps
    # the arm the caller was on and names the deployment whose answer was sent
    path = tmp_path / "trace.jsonl"
    srv = serve(held_canary(mock("broken", reply_tokens=4, error_rate=1.0), path, probes={"cases": []}))
    assert all(s == 200 for s in send_twice_each(srv, 30))
    rows = records(srv, path)
    assert {(r["arm"], r["deployment"]) for r in rows} == {("stable", "stable@1"), ("canary", "stable@1")}
