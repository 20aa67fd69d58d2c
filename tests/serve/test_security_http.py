"""Security, the HTTP server (issue 10, findings 4, 5, 6): read and idle timeouts, a connection
limit, slots freed when a client leaves, per-tenant shares and rates, an input-size cap checked
before admission. Raw sockets on loopback; a closed connection is observed as EOF (the socket's
own timeout only bounds a failing test)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket

import aiohttp
import pytest
import httpx
from gwkit import base_manifest, chat_body, hold, metric, post, release, until

REQ = b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    return s


def closed_by_server(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises socket.timeout if it never does)."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_silent_and_partial_header_connections_are_closed(serve):
    """Finding 4: connections with nothing or partial headers stayed open past 900 s."""
    srv = serve(base_manifest(http={"header_timeout_s": 0.5, "body_timeout_s": 0.5}))
    silent, partial = connect(srv), connect(srv)
    partial.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    assert closed_by_server(silent) == b""
    assert closed_by_server(partial) == b""


def test_a_body_slower_than_its_content_length_gets_408_and_is_closed(serve):
    srv = serve(base_manifest(http={"header_timeout_s": 5, "body_timeout_s": 0.5}))
    s = connect(srv)
    s.sendall(REQ + b"Content-Length: 100\r\n\r\n" + b'{"user_id": "u1", ')
    answer = closed_by_server(s)
    assert answer.startswith(b"HTTP/1.1 408") and b'"param":"body"' in answer


def test_idle_keep_alive_connections_are_closed(serve):
    srv = serve(base_manifest(http={"header_timeout_s": 0.5}))
    s = connect(srv)
    body = b'{"user_id": "u1", "prompt": "hi"}'
    s.sendall(REQ + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    answer = closed_by_server(s)  # answered, then closed once idle
    assert answer.startswith(b"HTTP/1.1 200")


def _served(conn: "http.client.HTTPConnection", headers: dict | None = None) -> int:
    body = b'{"user_id": "u1", "prompt": "hi"}'
    conn.request("POST", "/chat", body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    r.read()
    return r.status


def test_a_newcomer_displaces_the_oldest_socket_that_passed_no_key_check_never_a_proven_one(serve):
    """Finding 7 (issue 19): max_connections was one global count, so idle sockets filled it and keyed
    clients were reset. Now a connection that passed the key check keeps its place; a newcomer
    displaces the oldest one that did not, and is refused only when every place is proven."""
    import http.client
    import time

    srv = serve(base_manifest(http={"max_connections": 2, "header_timeout_s": 60, "reserved_for_keyed": 0.0}))
    a = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    assert _served(a) == 200                   # proven (anonymous access is allowed here), kept alive
    b = connect(srv)                           # only a socket
    time.sleep(0.1)
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    c.connect()
    assert closed_by_server(b) == b""          # the oldest unproven one made room
    assert _served(c) == 200 and _served(a) == 200
    d = connect(srv)                           # every place is proven now: the newcomer is refused
    assert closed_by_server(d) == b""
    assert _served(a) == 200 and _served(c) == 200


def test_idle_sockets_from_other_addresses_cannot_lock_a_keyed_client_out(serve):
    import hashlib
    import time

    m = base_manifest(anonymous=False, api_keys={"acme": [{"sha256": hashlib.sha256(b"k1").hexdigest()}]},
                      http={"max_connections": 8, "max_connections_per_client": 3, "header_timeout_s": 60})
    srv = serve(m)
    idle = []
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
        for _ in range(5):
            s = socket.socket()
            s.bind((host, 0))
            s.connect(("127.0.0.1", srv.port))
            idle.append(s)
    time.sleep(0.2)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for i in range(3):
                r = c.post("/chat", json=chat_body(f"q{i}"), headers={"authorization": "Bearer k1"})
                assert r.status_code == 200, r.text
            assert c.post("/chat", json=chat_body()).status_code == 401  # a keyless request is still refused
    finally:
        for s in idle:
            s.close()


def test_the_connection_rules_are_pure():
    from quantgate.serve.connections import ConnectionTable

    t = ConnectionTable(limit=4, per_client=2, reserved_for_keyed=0.25)  # pending take at most 3
    assert t.opened("a1", "A") == (True, []) and t.opened("a2", "A") == (True, [])
    assert t.opened("a3", "A") == (False, [])                        # A holds its 2 unproven
    t.proven("a1")
    assert t.opened("a3", "A") == (True, [])                         # a proven one no longer counts for A
    assert t.opened("b1", "B") == (True, [])
    assert t.opened("c1", "C") == (True, ["a2"])                     # at the limit: the oldest unproven goes
    for conn in ("a3", "b1", "c1"):
        t.proven(conn)
    assert t.opened("d1", "D") == (False, [])                        # all four proven: refused
    t.closed("c1")
    assert t.opened("d1", "D") == (True, [])
    room = ConnectionTable(limit=4, per_client=9, reserved_for_keyed=0.5)  # unproven take at most 2 of 4
    assert room.opened("x1", "X") == (True, []) and room.opened("x2", "Y") == (True, [])
    assert room.opened("x3", "Z") == (True, ["x1"]) and len(room) == 2


def test_a_client_that_leaves_frees_its_slot(serve):
    """Finding 5: two abandoned non-streaming requests with max_concurrency=2 locked everyone out."""
    m = base_manifest(max_concurrency=2, max_budget_ms=60000, cache={"enabled": False})
    srv = serve(m)
    ev = hold(srv)
    prov = srv.gateway.rt.providers["active"]
    body = b'{"user_id": "u1", "prompt": "slow", "budget_ms": 50000}'
    socks = []
    for _ in range(2):
        s = connect(srv)
        s.sendall(REQ + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(s)

    async def wait_for(pred, what):
        await until(pred, 10, what)

    srv.call(wait_for(lambda: prov.entered == 2 and srv.gateway.gate.in_flight == 2, "two requests held"))
    for s in socks:
        s.close()
    srv.call(wait_for(lambda: srv.gateway.gate.in_flight == 0, "slots freed after the clients left"))
    release(srv, ev)
    assert httpx.post(srv.url + "/chat", json=chat_body("next"), timeout=10).status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "quantgate_requests_total", outcome="client_closed") == 2


def test_a_prompt_over_the_input_cap_is_refused_before_admission(serve):
    """Finding 6: a 1 MiB prompt went to the worker."""
    srv = serve(base_manifest(max_input_tokens=100))
    r = httpx.post(srv.url + "/chat", json=chat_body("x" * 2000))
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages"
    assert "max_input_tokens=100" in r.json()["error"]["message"]
    assert srv.gateway.rt.providers["active"].entered == 0


def test_the_engines_context_caps_the_prompt_per_deployment(serve, upstream):
    """A prompt the engine's max model length cannot hold is the client's 413 before admission, never an
    upstream error; the gateway-wide cap stays when it is the smaller one."""
    m = base_manifest(max_input_tokens=8192)
    m["active"] = {"name": "remote", "max_tokens": 64, "engine": {"kind": "openai-url", "max_model_len": 128},
                   "provider": {"kind": "openai", "base_url": upstream.base_url, "model": "ok"}}
    srv = serve(m)
    r = httpx.post(srv.url + "/chat", json=chat_body("x" * 400))  # about 100 tokens > 128 - 64
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages"
    assert "'remote' deployment's engine takes (max_model_len=128 less max_tokens=64: 64)" in r.json()["error"]["message"]
    assert httpx.post(srv.url + "/chat", json=chat_body("short")).status_code == 200


TWO_TENANTS = {"a": [{"sha256": hashlib.sha256(b"key-a").hexdigest()}],
               "b": [{"sha256": hashlib.sha256(b"key-b").hexdigest()}]}


@pytest.mark.parametrize("how", ["explicit share", "default with two tenants' keys"])
def test_one_tenant_cannot_take_every_slot(serve, how):
    """#19 finding 8: concurrency_share defaulted to 1.0, so without tenant_limits one tenant of several
    could hold every slot; unset, it is now 0.5 where the key table names two or more tenants."""
    if how == "explicit share":
        srv = serve(base_manifest(max_concurrency=4, cache={"enabled": False},
                                  tenant_limits={"*": {"concurrency_share": 0.5}}))
        as_a, as_b = {"x-tenant": "a"}, {"x-tenant": "b"}
    else:
        srv = serve(base_manifest(max_concurrency=4, cache={"enabled": False}, api_keys=TWO_TENANTS, anonymous=False))
        as_a, as_b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    ev = hold(srv)
    prov = srv.gateway.rt.providers["active"]

    async def main():
        async with aiohttp.ClientSession() as s:
            url = srv.url + "/chat"
            held = [asyncio.ensure_future(post(s, url, chat_body(f"a{i}", budget_ms=8000), headers=as_a))
                    for i in range(2)]
            await until(lambda: prov.entered == 2, what="tenant a holds its share")
            third = await post(s, url, chat_body("a3"), headers=as_a)
            other = asyncio.ensure_future(post(s, url, chat_body("b1", budget_ms=8000), headers=as_b))
            await until(lambda: prov.entered == 3, what="tenant b gets a slot")
            release(srv, ev)
            return third, await other, await asyncio.gather(*held)

    third, other, held = asyncio.run(main())
    status, body, headers, _ = third
    assert status == 429 and body["error"]["limit"] == "concurrency_share" and int(headers["Retry-After"]) >= 1
    assert "concurrency_share" in body["error"]["message"]
    assert other[0] == 200 and [h[0] for h in held] == [200, 200]


def test_an_unset_share_is_half_with_several_tenants_and_whole_with_one():
    from quantgate.serve.limits import TenantLimiter, share_of
    from quantgate.serve.manifest import RateSpec

    assert share_of(RateSpec(), 0) == share_of(RateSpec(), 1) == 1.0
    assert share_of(RateSpec(), 2) == share_of(RateSpec(), 50) == 0.5
    assert share_of(RateSpec(concurrency_share=1.0), 5) == 1.0  # an explicit share is kept
    lim = TenantLimiter({}, tenants=2)
    assert [lim.take_slot("a", 4, 0.0) is None for _ in range(3)] == [True, True, False]
    lim.configure({}, tenants=1)
    assert lim.take_slot("a", 4, 0.0) is None  # one tenant: the gateway's own gate decides


def test_request_and_token_rates_are_limited_per_tenant(serve):
    srv = serve(base_manifest(cache={"enabled": False},
                              tenant_limits={"*": {"requests_per_s": 0.01, "burst": 2},
                                             "tok": {"tokens_per_min": 60}}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert [c.post("/chat", json=chat_body(f"q{i}")).status_code for i in range(2)] == [200, 200]
        r = c.post("/chat", json=chat_body("q3"))
        assert r.status_code == 429 and r.json()["error"]["limit"] == "requests_per_s"
        assert "requests_per_s" in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
        assert c.post("/chat", json=chat_body("other"), headers={"x-tenant": "other"}).status_code == 200
        # tokens: the estimate (prompt + max_tokens) is taken at admission
        long = "t" * 160  # ~40 tokens, + max_tokens 10 reserved; ~48 really used of 60 a minute
        assert c.post("/chat", json=chat_body(long, max_tokens=10), headers={"x-tenant": "tok"}).status_code == 200
        r = c.post("/chat", json=chat_body(long + "2", max_tokens=10), headers={"x-tenant": "tok"})
        assert r.status_code == 429 and r.json()["error"]["limit"] == "tokens_per_min"


def test_malformed_requests_cannot_fill_the_error_log(serve, caplog):
    """Found while hardening: aiohttp logged each unparseable request at ERROR with a traceback."""
    from quantgate.serve.server import MalformedRequests

    srv = serve(base_manifest())
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    for f in logging.getLogger("aiohttp.server").filters:  # one filter per process: start a fresh interval
        if isinstance(f, MalformedRequests):
            f.count, f.last = 0, None
    for i in range(30):
        s = connect(srv)
        s.sendall(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\x01: %d\r\n\r\n" % i)
        assert closed_by_server(s).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    mine = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert not [r for r in mine if r.levelno >= logging.ERROR or r.exc_info]
    [report] = mine  # one summary line for the interval, not thirty tracebacks
    assert report.levelno == logging.WARNING and "malformed HTTP requests" in report.getMessage()


def test_the_malformed_request_summary_counts_what_it_held_back():
    from aiohttp.http_exceptions import BadHttpMessage

    from quantgate.serve.server import MalformedRequests

    now = [0.0]
    f = MalformedRequests(interval_s=10, clock=lambda: now[0])

    def rec(exc):
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (),
                                 (type(exc), exc, None) if exc else None)

    first = rec(BadHttpMessage("bad header"))
    assert f.filter(first) and first.levelno == logging.WARNING and first.exc_info is None
    assert not any(f.filter(rec(BadHttpMessage("again"))) for _ in range(5))
    other = rec(RuntimeError("a real bug"))
    assert f.filter(other) and other.levelno == logging.ERROR  # never hides anything else
    now[0] = 11
    summary = rec(BadHttpMessage("later"))
    assert f.filter(summary) and "6 since the last report" in summary.getMessage()
