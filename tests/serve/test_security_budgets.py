"""Security, budgets and the shared ladder (issue 10, findings 2, 7, 8, 13): failures the client
causes never move the breaker; budgets are reserved at admission and settled at the end; the
ledger stays bounded and fast however many accounts clients invent."""

from __future__ import annotations

import httpx
from gwkit import base_manifest, chat_body, mock

from quantgate.serve.ladder import Level, upstream_fault

LADDER = {"min_samples": 5, "eval_interval_s": 60, "window_s": 600,
          "light": {"p95_ms": 100000}, "moderate": {"p95_ms": 100000},
          "heavy": {"p95_ms": 100000}, "breaker": {"error_rate": 0.5}}


def _level(srv) -> Level:
    async def evaluate():
        gw = srv.gateway
        gw._apply(gw.ladder.evaluate(gw.clock()))
        return gw.ladder.level
    return srv.call(evaluate())


def test_client_budget_timeouts_do_not_open_the_breaker(serve):
    """Finding 2: 30 requests with budget_ms=100 opened the breaker for every tenant."""
    m = base_manifest(ladder=LADDER)
    m["active"] = mock("primary", delay_ms=400, reply_tokens=8)
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(30):
            r = c.post("/chat", json=chat_body(f"q{i}", budget_ms=100))
            assert r.status_code in (200, 504), r.text
    assert _level(srv) == Level.NORMAL


def test_an_upstream_that_fails_still_opens_the_breaker(serve):
    """The control: the same ladder does react to the upstream's own failures."""
    m = base_manifest(ladder=LADDER)
    m["active"] = mock("primary", error_rate=1.0)
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(10):
            c.post("/chat", json=chat_body(f"q{i}"))
    assert _level(srv) == Level.BREAKER


def test_upstream_4xx_does_not_move_the_ladder(serve, upstream):
    m = base_manifest(ladder=LADDER)
    m["active"] = {"name": "up", "provider": {"kind": "openai", "base_url": upstream.base_url, "model": "error-400"}}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(10):
            r = c.post("/chat", json=chat_body(f"q{i}"))
            assert r.status_code == 200 and r.json()["degrade"]["path"] == ["active:rejected", "fallback"]
            assert "stub upstream error" not in r.text
    assert _level(srv) == Level.NORMAL


def test_which_failures_are_the_upstreams():
    assert upstream_fault("error", 10, 1000) and upstream_fault("unavailable", 10, 1000)
    assert not upstream_fault("rejected", 5000, 100) and not upstream_fault("invalid", 5000, 100)
    assert not upstream_fault("timeout", 50, 400)      # the client's budget was too small to judge
    assert upstream_fault("timeout", 2000, 400)        # the upstream had plenty of time
