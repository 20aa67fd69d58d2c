"""Security, auth and tenancy (issue 10, findings 1, 12, 13): keys bound to tenants and users,
anonymous access only on loopback and only when the manifest says so, admin-only operations,
Host/Origin/Content-Type checks, header values that must be whole ASCII numbers."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from gwkit import base_manifest, chat_body, oai_body

from quantgate.serve.access import exposure_problem, identify, key_table
from quantgate.serve.manifest import Manifest, ManifestError
from quantgate.serve.server import ServerThread


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = {"acme": [{"sha256": sha("acme-key")}, {"sha256": sha("acme-alice"), "user": "alice"}],
        "trial": [{"sha256": sha("trial-key")}]}
ADMIN = [{"sha256": sha("ops-key")}]


def keyed(**more) -> dict:
    return base_manifest(api_keys=KEYS, admin_keys=ADMIN, anonymous=False, **more)


def test_without_keys_and_without_anonymous_every_request_needs_a_key(serve):
    srv = serve(base_manifest(anonymous=False))
    r = httpx.post(srv.url + "/chat", json=chat_body())
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"


def test_a_public_bind_without_keys_refuses_to_start(manifest_path):
    from gwkit import write

    write(manifest_path, base_manifest(anonymous=False))
    with pytest.raises(ManifestError, match="no API keys"):
        ServerThread(manifest_path, host="0.0.0.0").start()
    write(manifest_path, base_manifest(api_keys=KEYS, anonymous=True))
    with pytest.raises(ManifestError, match="anonymous"):
        ServerThread(manifest_path, host="0.0.0.0").start()


def test_exposure_rules_are_pure():
    m = Manifest.model_validate(base_manifest(anonymous=False))
    assert exposure_problem(m.serving, {}, "127.0.0.1") is None
    assert exposure_problem(m.serving, {}, "::1") is None
    assert "no API keys" in exposure_problem(m.serving, {}, "0.0.0.0")
    assert "no API keys" in exposure_problem(m.serving, {}, "192.168.1.4")
    mk = Manifest.model_validate(keyed())
    assert exposure_problem(mk.serving, key_table(mk, "m"), "0.0.0.0") is None


def test_anonymous_cannot_spend_a_keyed_tenants_budget(serve):
    """Finding 1: one anonymous request naming tenant `trial` drained it for its real users."""
    srv = serve(base_manifest(api_keys=KEYS, anonymous=True, budgets={"tenants": {"trial": {"tokens": 10}}}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/chat", json=chat_body(tenant="trial"))
        assert r.status_code == 401 and "trial" in r.json()["error"]["message"]
        r = c.post("/chat", json=chat_body(), headers={"x-tenant": "trial"})
        assert r.status_code == 401
        assert c.post("/chat", json=chat_body(), headers={"x-api-key": "trial-key"}).status_code == 200
        # anonymous, loopback, a tenant with no keys: served (the manifest said so)
        assert c.post("/chat", json=chat_body(tenant="playground")).status_code == 200


def test_a_key_names_the_tenant_and_a_bound_key_names_the_user(serve):
    srv = serve(keyed(budgets={"per_user": {"tokens": 5}}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        alice = {"x-api-key": "acme-alice"}
        r = c.post("/chat", json=chat_body(user_id="bob"), headers=alice)
        assert r.status_code == 403 and r.json()["error"]["param"] == "user"
        r = c.post("/v1/chat/completions", json=oai_body("first"), headers=alice)  # no user in the body
        assert r.status_code == 200
        # the answer was charged to alice: over her per-user budget now, whatever the body omits
        r = c.post("/v1/chat/completions", json=oai_body("second"), headers=alice)
        assert r.status_code == 429 and r.json()["error"]["account"] == "user:acme/alice"
        r = c.post("/chat", json=chat_body(tenant="trial"), headers={"x-api-key": "acme-key"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "tenant"
        r = c.post("/chat", json=chat_body(), headers={"x-api-key": "ops-key"})
        assert r.status_code == 403  # an admin key is not a tenant's key


def test_identify_never_takes_the_tenant_from_the_body_when_a_key_is_used():
    m = Manifest.model_validate(keyed())
    keys = key_table(m, "m")
    p = keys[sha("acme-key")]
    assert identify(m.serving, keys, p, True, None, "u9") == ("acme", "u9")
    assert identify(m.serving, keys, keys[sha("acme-alice")], True, "acme", None) == ("acme", "alice")


def test_metrics_and_readyz_details_need_the_admin_key(serve):
    srv = serve(keyed())
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"x-api-key": "acme-key"}).status_code == 403
        assert c.get("/metrics", headers={"x-api-key": "ops-key"}).status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready"}  # no paths, no deployments
        assert str(srv.manifest) not in r.text
        r = c.get("/readyz", headers={"authorization": "Bearer ops-key"})
        assert r.json()["active"] == "primary@1" and r.json()["manifest"] == str(srv.manifest)


def test_cross_site_and_rebinding_requests_are_refused(serve):
    """Finding 12: a text/plain POST from a web page, or a rebinding Host, reached the gateway."""
    srv = serve(base_manifest())
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        body = b'{"user_id": "u1", "prompt": "hi"}'
        r = c.post("/chat", content=body, headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"
        r = c.post("/chat", content=body, headers={"content-type": "application/json", "host": "evil.example:8787"})
        assert r.status_code == 421 and r.json()["error"]["param"] == "host"
        assert c.get("/metrics", headers={"host": "evil.example"}).status_code == 421
        r = c.post("/chat", json=chat_body(), headers={"origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
        assert c.post("/chat", json=chat_body(), headers={"host": "localhost"}).status_code == 200


def test_allowed_hosts_and_origins_come_from_the_manifest(serve):
    srv = serve(base_manifest(http={"allowed_hosts": ["gw.internal"], "allowed_origins": ["https://app.example"]}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.post("/chat", json=chat_body(), headers={"host": "gw.internal"}).status_code == 200
        assert c.post("/chat", json=chat_body(), headers={"origin": "https://app.example"}).status_code == 200


@pytest.mark.parametrize("value", ["²", "١٢", "12a", "5.0", "99999999999999"])
def test_x_budget_ms_is_plain_ascii_digits(serve, value):
    """Finding 13: '²' passed isdigit() and then raised (500)."""
    srv = serve(base_manifest())
    r = httpx.post(srv.url + "/v1/chat/completions", json=oai_body(), headers={"x-budget-ms": value.encode()})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-budget-ms"


def test_budget_ms_true_is_not_one_millisecond(serve):
    srv = serve(base_manifest())
    r = httpx.post(srv.url + "/chat", json=chat_body(budget_ms=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "budget_ms"
    r = httpx.post(srv.url + "/v1/chat/completions", json=oai_body(max_tokens=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_a_body_without_a_valid_key_is_neither_read_nor_parsed(serve):
    """Finding 8 (issue 19): the body of an unauthenticated request was read and parsed in full before
    the key was checked. The key check now runs on the headers: the 401 comes without the body."""
    import socket
    import time

    srv = serve(keyed(http={"body_timeout_s": 5}))
    for auth in (b"", b"Authorization: Bearer wrong\r\n"):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        t = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + auth + b"Content-Length: 1000000\r\n\r\n")  # and no body at all
        got = s.recv(65536)
        s.close()
        assert got.startswith(b"HTTP/1.1 401") and time.monotonic() - t < 2, got[:200]
