"""Security, budgets and the shared ladder (issue 10, findings 2, 7, 8, 13): failures the client
causes never move the breaker; budgets are reserved at admission and settled at the end; the
ledger stays bounded and fast however many accounts clients invent."""

from __future__ import annotations

import httpx
from gwkit import base_manifest, chat_body, ladder_level, mock

from quantgate.serve.ladder import Level, upstream_fault

LADDER = {"min_samples": 5, "eval_interval_s": 60, "window_s": 600,
          "light": {"p95_ms": 100000}, "moderate": {"p95_ms": 100000},
          "heavy": {"p95_ms": 100000}, "breaker": {"error_rate": 0.5}}


def test_client_budget_timeouts_do_not_open_the_breaker(serve):
    """Finding 2: 30 requests with budget_ms=100 opened the breaker for every tenant."""
    m = base_manifest(ladder=LADDER)
    m["active"] = mock("primary", delay_ms=400, reply_tokens=8)
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(30):
            r = c.post("/chat", json=chat_body(f"q{i}", budget_ms=100))
            assert r.status_code in (200, 504), r.text
    assert ladder_level(srv) == Level.NORMAL


def test_an_upstream_that_fails_still_opens_the_breaker(serve):
    """The control: the same ladder does react to the upstream's own failures."""
    m = base_manifest(ladder=LADDER)
    m["active"] = mock("primary", error_rate=1.0)
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(10):
            c.post("/chat", json=chat_body(f"q{i}"))
    assert ladder_level(srv) == Level.BREAKER


def test_upstream_4xx_does_not_move_the_ladder(serve, upstream):
    m = base_manifest(ladder=LADDER)
    m["active"] = {"name": "up", "provider": {"kind": "openai", "base_url": upstream.base_url, "model": "error-400"}}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for i in range(10):
            r = c.post("/chat", json=chat_body(f"q{i}"))
            assert r.status_code == 200 and r.json()["degrade"]["path"] == ["active:rejected", "fallback"]
            assert "stub upstream error" not in r.text
    assert ladder_level(srv) == Level.NORMAL


def test_which_failures_are_the_upstreams():
    assert upstream_fault("error", 10, 1000) and upstream_fault("unavailable", 10, 1000)
    assert not upstream_fault("rejected", 5000, 100) and not upstream_fault("invalid", 5000, 100)
    assert not upstream_fault("timeout", 50, 400)      # the client's budget was too small to judge
    assert upstream_fault("timeout", 2000, 400)        # the upstream had plenty of time


def test_concurrent_requests_cannot_overshoot_a_budget_by_n_answers(serve):
    """Finding 8: budgets were checked before and charged after, so N concurrent requests all passed."""
    import asyncio

    import aiohttp
    from gwkit import hold, post, release, until

    srv = serve(base_manifest(cache={"enabled": False}, budgets={"tenants": {"acme": {"tokens": 80}}}))
    ev = hold(srv)
    prov = srv.gateway.rt.providers["active"]

    async def main():
        async with aiohttp.ClientSession() as s:
            url, h = srv.url + "/chat", {"x-tenant": "acme"}
            first = asyncio.ensure_future(post(s, url, chat_body("one", max_tokens=90), headers=h))
            await until(lambda: prov.entered == 1, what="the first request admitted")
            others = await asyncio.gather(*[post(s, url, chat_body(f"n{i}", max_tokens=90), headers=h)
                                            for i in range(5)])
            release(srv, ev)
            return await first, others

    first, others = asyncio.run(main())
    assert first[0] == 200
    for status, body, headers, _ in others:
        assert status == 429 and body["error"]["account"] == "tenant:acme" and "reserved" in body["error"]["message"]
    usage = srv.gateway.ledger.usage("tenant:acme")
    assert usage.reserved_tokens == 0 and 0 < usage.tokens <= 80  # settled to what it really cost


def test_a_client_that_leaves_mid_stream_is_charged_and_logged_without_a_traceback(serve, caplog):
    """Finding 7: a stream cut by the client was free, and logged as an internal error."""
    import socket

    from gwkit import metric, until

    m = base_manifest(cache={"enabled": False}, budgets={"tenants": {"*": {"tokens": 100000}}})
    m["active"] = mock("primary", reply_tokens=400, tokens_per_s=200)
    srv = serve(m)
    body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "tell me a story"}]}'
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 4:  # a few pieces arrived
        got += s.recv(65536)
    s.close()

    async def charged():
        await until(lambda: (srv.gateway.ledger.usage("tenant:default") or None) is not None
                    and srv.gateway.ledger.usage("tenant:default").tokens > 0, 10, "the partial answer charged")
    srv.call(charged())
    assert srv.gateway.ledger.usage("tenant:default").reserved_tokens == 0
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "quantgate_requests_total", outcome="client_closed") == 1
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]


def test_the_ledger_stays_bounded_and_keeps_tenant_accounts():
    """Finding 13: past 100k accounts the ledger rescanned every account for each new one."""
    from quantgate.serve.manifest import BudgetsSpec
    from quantgate.serve.tenants import Ledger, Reservation

    led = Ledger(BudgetsSpec.model_validate({"tenants": {"acme": {"tokens": 10}}, "per_user": {"tokens": 5}}),
                 max_accounts=1000)
    led.charge("acme", "u0", 3, 0.0, 100.0)
    for i in range(1, 5000):
        led.charge("acme", f"invented-{i}", 1, 0.0, 100.0)
    assert len(led) <= 1000 + 1
    assert led.usage("tenant:acme").tokens == 3 + 4999  # never evicted by invented users
    assert led.check("acme", "someone", 100.0).account == "tenant:acme"
    r = led.reserve("beta", None, 50, 0.0, 100.0)
    assert isinstance(r, Reservation)
    led.settle(r, 7, 0.0, 100.0)
    led.settle(r, 7, 0.0, 100.0)  # settling twice charges once
