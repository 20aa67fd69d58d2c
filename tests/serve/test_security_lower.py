"""The lower findings of the second audit (issue 19, finding 8): the trace is the gateway user's own
and not filled by strangers' 401s; /v1/models answers only callers who may use the deployments; a
user-bound key does not get another user's cached answers; a global-budget refusal does not tell a
tenant what everyone spent; MLflow URIs lose their query-string tokens."""

from __future__ import annotations

import hashlib
import json
import stat
import time

import httpx
import pytest
from gwkit import base_manifest, chat_body, oai_body

from quantgate.serve.cache import cache_scope
from quantgate.serve.tenants import OverBudget
from quantgate.util import redact_uri


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = {"acme": [{"sha256": sha("alice-key"), "user": "alice"}, {"sha256": sha("bob-key"), "user": "bob"},
                 {"sha256": sha("acme-key")}]}


def _trace_lines(path) -> list[dict]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    return [json.loads(x) for x in path.read_text().splitlines()[1:]]


def test_the_trace_is_created_0600_and_strangers_401s_are_not_in_it(serve, tmp_path):
    trace = tmp_path / "traces" / "gw.jsonl"
    trace.parent.mkdir()
    trace.write_text("")
    trace.chmod(0o644)  # a file an earlier run left readable
    srv = serve(base_manifest(api_keys=KEYS, anonymous=False, trace={"path": str(trace)}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for _ in range(20):
            assert c.post("/chat", json=chat_body()).status_code == 401
            assert c.post("/chat", json=chat_body(), headers={"x-api-key": "wrong"}).status_code == 401
        assert c.post("/chat", json=chat_body(user_id="alice"), headers={"x-api-key": "alice-key"}).status_code == 200
    lines = _trace_lines(trace)
    assert [x["outcome"] for x in lines] == ["ok"]
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600


def test_models_needs_the_same_key_host_and_origin_as_a_request(serve):
    srv = serve(base_manifest(api_keys=KEYS, anonymous=False, admin_keys=[{"sha256": sha("ops")}]))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"x-api-key": "acme-key", "origin": "https://evil.example"}).status_code == 403
        assert c.get("/v1/models", headers={"x-api-key": "acme-key", "host": "evil.example"}).status_code == 421
        ok = c.get("/v1/models", headers={"x-api-key": "acme-key"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "primary"
        assert c.get("/v1/models", headers={"x-api-key": "ops"}).status_code == 200


@pytest.mark.parametrize("scope, bob_hits", [(None, False), ("user", False), ("tenant", True)])
def test_a_user_bound_key_does_not_get_another_users_cached_answer(serve, scope, bob_hits):
    cache = {"scope": scope} if scope else {}
    srv = serve(base_manifest(api_keys=KEYS, anonymous=False, cache=cache))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        def ask(key):
            r = c.post("/v1/chat/completions", json=oai_body("my salary review"), headers={"x-api-key": key})
            assert r.status_code == 200
            return r.headers["x-quantgate-cache"]

        assert ask("alice-key") == "miss" and ask("alice-key") == "hit"
        assert ask("bob-key") == ("hit" if bob_hits else "miss")


def test_cache_scopes_are_pure():
    assert cache_scope("key", "acme", "alice", "k1") == "acme#k1"
    assert cache_scope("key", "acme", None, None) == "acme"          # anonymous: its tenant
    assert cache_scope("user", "acme", "alice", "k1") == "acme/alice"
    assert cache_scope("user", "acme", None, "k1") == "acme"
    assert cache_scope("tenant", "acme", "alice", "k1") == "acme"


def test_a_global_budget_refusal_does_not_tell_a_tenant_the_total_spend():
    over = OverBudget("global", "123456/100000 tokens, 42 reserved", 3600.0)
    msg = over.message(0.0)
    assert "123456" not in msg and "100000" not in msg and "resets at" in msg
    assert "1/10 tokens" in OverBudget("tenant:acme", "1/10 tokens", 3600.0).message(0.0)  # its own: told


def test_the_global_budget_429_over_http_shows_no_numbers(serve):
    srv = serve(base_manifest(budgets={"global": {"tokens": 1}}, cache={"enabled": False}))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        c.post("/chat", json=chat_body("first"))
        r = c.post("/chat", json=chat_body("second"))
    assert r.status_code == 429 and r.json()["error"]["account"] == "global"
    assert "tokens" not in r.json()["error"]["message"]


@pytest.mark.parametrize("uri, hidden", [
    ("https://mlflow.example/api?token=abc123&x=1", "abc123"),
    ("http://h:5000/?access_token=zz9#f", "zz9"),
    ("https://u:pw@h/x?api_key=q77", "q77"),
    ("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1", "deadbeef"),
])
def test_mlflow_uris_lose_query_string_tokens(uri, hidden):
    out = redact_uri(uri)
    assert hidden not in out and "***" in out
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact_uri("lr=0.1 and key=3") == "lr=0.1 and key=3"  # not a URI query: untouched
