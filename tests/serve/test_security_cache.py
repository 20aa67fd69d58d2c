"""Security, cache (issue 10, finding 3): the key covers everything that changes the answer, and
answers are scoped per tenant unless the manifest marks a deployment's answers shareable."""

from __future__ import annotations

import hashlib

import httpx
from gwkit import base_manifest, mock, oai_body

from quantgate.serve.cache import cache_key

MSGS = [{"role": "user", "content": "what is our Q3 plan?"}]


def test_the_key_changes_with_tenant_seed_sampling_and_ignore_eos():
    base = cache_key("d@1", MSGS, 64, 0.7, 0.9, None, 1, "acme")
    assert cache_key("d@1", MSGS, 64, 0.7, 0.9, None, 1, "beta") != base
    assert cache_key("d@1", MSGS, 64, 0.7, 0.9, None, 2, "acme") != base
    assert cache_key("d@1", MSGS, 64, 0.8, 0.9, None, 1, "acme") != base
    assert cache_key("d@1", MSGS, 64, 0.7, 0.9, ["x"], 1, "acme") != base
    assert cache_key("d@1", MSGS, 32, 0.7, 0.9, None, 1, "acme") != base
    assert cache_key("d@2", MSGS, 64, 0.7, 0.9, None, 1, "acme") != base
    assert cache_key("d@1", MSGS, 64, 0.7, 0.9, None, 1, None) != base
    assert cache_key("d@1", MSGS, 64, 0.7, 0.9, None, 1, "acme", ignore_eos=True) != base


def _keys():
    return {t: [{"sha256": hashlib.sha256(f"{t}-key".encode()).hexdigest()}] for t in ("acme", "beta")}


def test_another_tenant_never_gets_the_answer_nor_the_hit_header(serve):
    srv = serve(base_manifest(api_keys=_keys(), anonymous=False))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        a = c.post("/v1/chat/completions", json=oai_body("secret plan"), headers={"x-api-key": "acme-key"})
        assert a.status_code == 200 and a.headers["x-quantgate-cache"] == "miss"
        again = c.post("/v1/chat/completions", json=oai_body("secret plan"), headers={"x-api-key": "acme-key"})
        assert again.headers["x-quantgate-cache"] == "hit"  # the cache works within the tenant
        b = c.post("/v1/chat/completions", json=oai_body("secret plan"), headers={"x-api-key": "beta-key"})
        assert b.status_code == 200 and b.headers["x-quantgate-cache"] == "miss"
        assert b.json()["quantgate"]["cached"] is False
        # a different seed is a different answer
        s = c.post("/v1/chat/completions", json=oai_body("secret plan", seed=7), headers={"x-api-key": "acme-key"})
        assert s.headers["x-quantgate-cache"] == "miss"


def test_a_shareable_deployment_shares_its_cache(serve):
    m = base_manifest(api_keys=_keys(), anonymous=False)
    m["active"] = {**mock("primary", reply_tokens=8), "shared_cache": True}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        c.post("/v1/chat/completions", json=oai_body("public faq"), headers={"x-api-key": "acme-key"})
        b = c.post("/v1/chat/completions", json=oai_body("public faq"), headers={"x-api-key": "beta-key"})
        assert b.headers["x-quantgate-cache"] == "hit"
