"""The gateway over real HTTP on loopback: /chat, bad input, health, metrics, tenants, keys, the socket."""

from __future__ import annotations

import hashlib
import socket

import httpx
import pytest
from gwkit import base_manifest, chat_body, metric, mock


def test_chapter_curl_example_then_cached_repeat(serve):
    srv = serve(base_manifest())
    body = {"user_id": "u1", "prompt": "给一个推理预算与降级的最小策略", "budget_ms": 1200}
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/chat", json=body, headers={"x-trace-id": "demo-001"})
        assert r.status_code == 200, r.text
        a = r.json()
        assert r.headers["x-trace-id"] == "demo-001" and a["trace_id"] == "demo-001"
        assert a["text"].startswith("[primary]") and a["cached"] is False
        assert (a["deployment"], a["model_version"]) == ("primary", "1")
        assert a["degrade"] == {"level": "normal", "path": ["active"], "reasons": [], "notice": None}
        assert a["tokens"]["out"] == 8 and a["tokens"]["in"] > 0 and a["budget_ms"] == 1200
        assert set(a["latency_ms"]) == {"queue", "upstream", "generation", "total"}
        # the same prompt again (modulo whitespace): from the cache, same text, no upstream call
        before = srv.gateway.rt.providers["active"].entered
        r2 = c.post("/chat", json={**body, "prompt": body["prompt"] + "  "})
        b = r2.json()
        assert b["cached"] is True and b["text"] == a["text"] and b["degrade"]["path"] == ["cache"]
        assert r2.headers["x-quantgate-cache"] == "hit" and b["cost_usd"] == 0
        assert srv.gateway.rt.providers["active"].entered == before
        # a generated trace id when none is given
        r3 = c.post("/chat", json=chat_body("another prompt"))
        assert len(r3.json()["trace_id"]) == 16 and r3.headers["x-trace-id"] == r3.json()["trace_id"]


BAD = [
    (b'{"user_id": "u1", "prompt": "x"', {}, 400, "body"),
    (b'{"user_id": "u1", "prompt": 5}', {}, 400, "prompt"),
    (b'{"user_id": "u1"}', {}, 400, "prompt"),
    (b'{"user_id": "u1", "prompt": "x", "budget_ms": -3}', {}, 400, "budget_ms"),
    (b'{"user_id": "u1", "prompt": "x", "budget_ms": 86400000}', {}, 400, "budget_ms"),
    (b'{"user_id": "u1", "prompt": "x", "max_tokens": 1000000}', {}, 400, "max_tokens"),
    (b'{"user_id": "u1", "prompt": "x", "budgetms": 100}', {}, 400, "budgetms"),
    (b'{"user_id": "u1", "prompt": "' + b"x" * 5000 + b'"}', {}, 413, "body"),
    (b'{"user_id": "u1", "prompt": "x"}', {"x-trace-id": "no spaces allowed"}, 400, "x-trace-id"),
    (b'"just a string"', {}, 400, "body"),
]


def test_bad_input_gets_4xx_naming_the_field_and_the_gateway_keeps_serving(serve):
    srv = serve(base_manifest(max_body_bytes=4096))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for raw, headers, status, field in BAD:
            r = c.post("/chat", content=raw, headers={"content-type": "application/json", **headers})
            assert r.status_code == status, (raw[:60], r.text)
            err = r.json()["error"]
            assert err["param"] == field and err["message"].startswith(field), err
        # a chunked body (no Content-Length) over the limit is refused too
        r = c.post("/chat", content=iter([b'{"user_id": "u1", "prompt": "', b"y" * 5000, b'"}']),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                   headers={"x-budget-ms": "-5"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-budget-ms"
        assert c.post("/chat", json=chat_body()).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "quantgate_rejected_total", reason="bad_request") == len(BAD) + 3


def test_health_ready_models_and_metrics(serve):
    srv = serve(base_manifest())
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert r.json()["active"] == "primary@1" and r.json()["fallback"] == "fallback@1"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["primary", "fallback"]
        for p in ("one", "two", "one"):
            assert c.post("/chat", json=chat_body(p, max_tokens=5)).status_code == 200
        c.post("/chat", json={"nope": 1})
        text = c.get("/metrics").text
    dep = {"deployment": "primary", "model_version": "1"}
    assert metric(text, "quantgate_requests_total", route="chat", outcome="ok", **dep) == 2
    assert metric(text, "quantgate_requests_total", route="chat", outcome="cached", **dep) == 1
    assert metric(text, "quantgate_cache_hits_total", **dep) == 1
    assert metric(text, "quantgate_cache_misses_total", **dep) == 2
    assert metric(text, "quantgate_tokens_total", direction="out", **dep) == 10
    assert metric(text, "quantgate_request_latency_seconds_count", route="chat", outcome="ok", **dep) == 2
    assert metric(text, "quantgate_in_flight") == 0
    assert metric(text, "quantgate_active_deployment", **dep) == 1
    assert metric(text, "quantgate_degrade_level") == 0


def test_readyz_is_503_when_the_active_provider_is_not_ready(serve):
    m = base_manifest()
    m["active"] = {"name": "cli", "provider": {"kind": "command", "argv": ["/nonexistent/llm-cli", "{prompt}"]}}
    srv = serve(m)
    r = httpx.get(srv.url + "/readyz")
    assert r.status_code == 503 and "not found" in r.json()["active_ready"]
    # and the fallback still answers
    a = httpx.post(srv.url + "/chat", json=chat_body()).json()
    assert a["deployment"] == "fallback" and a["degrade"]["path"] == ["active:unavailable", "fallback"]


def test_tenant_over_budget_gets_429_with_reset_time(serve):
    srv = serve(base_manifest(budgets={"tenants": {"trial": {"tokens": 10, "period_s": 3600}},
                                       "per_user": {"tokens": 1000, "period_s": 60}}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.post("/chat", json=chat_body("first", tenant="trial")).status_code == 200   # 8 out + in ≥ 10
        r = c.post("/chat", json=chat_body("second", tenant="trial"))
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "budget_exceeded" and err["account"] == "tenant:trial"
        assert "resets at" in err["message"] and err["reset_at"].endswith("Z")
        assert 1 <= int(r.headers["retry-after"]) <= 3600
        # other tenants are not affected; header x-tenant works too
        assert c.post("/chat", json=chat_body("second"), headers={"x-tenant": "other"}).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "quantgate_429_total", reason="budget") == 1


def test_api_keys_identify_the_tenant(serve, monkeypatch):
    monkeypatch.setenv("QG_TEST_KEY_BETA", "beta-secret")
    keys = {"acme": [{"sha256": hashlib.sha256(b"acme-secret").hexdigest()}], "beta": [{"env": "QG_TEST_KEY_BETA"}]}
    srv = serve(base_manifest(api_keys=keys, anonymous=False, budgets={"tenants": {"acme": {"tokens": 0}}}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/chat", json=chat_body())
        assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"
        r = c.post("/chat", json=chat_body(), headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and "unknown API key" in r.json()["error"]["message"]
        r = c.post("/chat", json=chat_body(), headers={"x-api-key": "beta-secret"})
        assert r.status_code == 200
        r = c.post("/chat", json=chat_body(tenant="acme"), headers={"x-api-key": "beta-secret"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "tenant"
        r = c.post("/chat", json=chat_body(), headers={"authorization": "Bearer acme-secret"})
        assert r.status_code == 429 and "tenant:acme" in r.json()["error"]["message"]   # the key's tenant


def test_listening_socket_has_nodelay_and_a_deep_backlog():
    from quantgate.serve.server import BACKLOG, listen_socket

    s = listen_socket("127.0.0.1", 0)
    try:
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert BACKLOG >= 1024
        # connections beyond a backlog of 5 are queued, not refused, before anything accepts them
        clients = [socket.create_connection(s.getsockname(), timeout=2) for _ in range(64)]
        for c in clients:
            c.close()
    finally:
        s.close()


def test_bad_manifest_at_start_is_a_clear_error(manifest_path):
    from gwkit import write

    from quantgate.serve.manifest import ManifestError
    from quantgate.serve.server import ServerThread

    m = base_manifest()
    m["serving"]["max_concurency"] = 3
    write(manifest_path, m)
    with pytest.raises(ManifestError, match=r"manifest.json:\d+: serving.max_concurency: unknown field"):
        ServerThread(manifest_path).start()


def test_command_provider_runs_the_cli_and_kills_it_on_timeout(serve):
    import sys

    m = base_manifest()
    m["active"] = {"name": "cli", "provider": {
        "kind": "command", "timeout_s": 5,
        "argv": [sys.executable, "-c", "import sys, time; p = sys.argv[1]; "
                 "time.sleep(30) if 'hang' in p else print(p.upper())", "{prompt}"]}}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        a = c.post("/chat", json=chat_body("shout this; rm -rf /")).json()
        assert a["text"] == "SHOUT THIS; RM -RF /" and a["deployment"] == "cli"
        a = c.post("/chat", json=chat_body("please hang", budget_ms=1500)).json()
        assert a["deployment"] == "fallback" and a["degrade"]["path"] == ["active:timeout", "fallback"]


def test_unknown_tenant_header_is_validated(serve):
    srv = serve(base_manifest())
    r = httpx.post(srv.url + "/chat", json=chat_body(), headers={"x-tenant": "bad tenant!"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-tenant"


def test_fallback_is_optional(serve):
    m = base_manifest()
    del m["serving"]["fallback"]
    m["active"] = mock("solo", error_rate=1.0)
    srv = serve(m)
    r = httpx.post(srv.url + "/chat", json=chat_body())
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    # the client sees the trace id, not the upstream's words (those are in the log)
    assert r.json()["trace_id"] in r.json()["error"]["message"]
    assert "mock upstream error" not in r.json()["error"]["message"]
