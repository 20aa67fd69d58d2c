"""Property-based checks (Hypothesis) over the request schemas and the pure decisions behind
admission, budgets and the degrade ladder: no input makes the gateway answer 5xx or raise, and no
sequence of client-caused failures moves the ladder."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from gwkit import base_manifest, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantgate.serve.admission import decide, effective_limit, retry_after_s
from quantgate.serve.budget import Attempt, Estimate, plan_request
from quantgate.serve.ladder import Level
from quantgate.serve.limits import take
from quantgate.serve.manifest import BudgetsSpec
from quantgate.serve.records import ChatCall, RequestState
from quantgate.serve.server import ServerThread
from quantgate.serve.tenants import Ledger, OverBudget

LADDER = {"min_samples": 1, "eval_interval_s": 60, "breaker": {"error_rate": 0.5}}
CALL = ChatCall("chat", "prop", "t", None, [{"role": "user", "content": "hi"}], time.perf_counter())
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
FIELDS = ["user_id", "prompt", "budget_ms", "max_tokens", "tenant", "temperature", "model", "messages", "stream",
          "seed", "top_p", "stop", "user", "n", "stream_options", "max_completion_tokens"]
bodies = st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("props") / "manifest.json",
                 base_manifest(budgets={"tenants": {"*": {"tokens": 10**9}}}, max_input_tokens=4096,
                               ladder=LADDER))
    srv = ServerThread(path).start()
    yield srv
    srv.stop()


@SETTINGS
@given(body=bodies, route=st.sampled_from(["/chat", "/v1/chat/completions"]),
       budget=st.none() | header_text, tenant=st.none() | header_text, trace=st.none() | header_text)
def test_no_request_gets_a_5xx(gateway, body, route, budget, tenant, trace):
    import json

    headers = {"content-type": "application/json"}
    for name, value in (("x-budget-ms", budget), ("x-tenant", tenant), ("x-trace-id", trace)):
        if value is not None:
            headers[name] = value.strip().encode("latin-1")
    r = httpx.post(gateway.url + route, content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert r.json()["error"]["message"]  # (a header aiohttp's parser refuses gets its plain-text 400)


@SETTINGS
@given(in_flight=st.integers(0, 10**6), queued=st.integers(0, 10**6), limit=st.integers(1, 10**6),
       queue=st.integers(0, 10**6), latency=st.floats(0, 1e9), factor=st.floats(1e-6, 1))
def test_admission_decisions_are_total(in_flight, queued, limit, queue, latency, factor):
    decide(in_flight, queued, limit, queue)
    assert effective_limit(limit, factor) >= 1
    assert retry_after_s(in_flight, queued, limit, latency) >= 1


@SETTINGS
@given(remaining=st.floats(-1e6, 1e7), tokens=st.integers(1, 10**5), fb=st.booleans(),
       route=st.sampled_from(["active", "probe", "fallback"]),
       est=st.none() | st.tuples(st.floats(0, 1e6), st.floats(0, 1e4)))
def test_plans_are_total_and_within_the_budget(remaining, tokens, fb, route, est):
    e = Estimate(*est) if est else None
    plan = plan_request(remaining_ms=remaining, route=route, max_tokens=tokens, has_fallback=fb,
                        est_active=e, est_fallback=e)
    for a in plan.attempts:
        assert isinstance(a, Attempt) and 1 <= a.max_tokens <= tokens and a.timeout_ms <= remaining + 1e-6


@SETTINGS
@given(steps=st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1e4), st.floats(0.001, 1e4), st.floats(1, 1e6),
                                st.floats(0, 1e6)), max_size=30))
def test_token_buckets_never_go_negative(steps):
    level, last = 0.0, 0.0
    for dt, rate, cost, capacity, _ in steps:
        now = last + dt
        ok, level, wait = take(level, last, now, rate, capacity, cost)
        last = now
        assert 0 <= level <= capacity and wait >= 0 and (ok or wait > 0 or math.isinf(wait))


@SETTINGS
@given(ops=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "u1", "u2"]),
                              st.integers(0, 500), st.integers(0, 500)), max_size=40))
def test_reservations_always_settle_back_to_zero(ops):
    led = Ledger(BudgetsSpec.model_validate({"tenants": {"*": {"tokens": 1000}}, "per_user": {"tokens": 300},
                                             "global": {"tokens": 5000}}), max_accounts=4)
    held = []
    for tenant, user, est, used in ops:
        r = led.reserve(tenant, user, est, 0.0, 1000.0)
        if not isinstance(r, OverBudget):
            held.append((r, used))
    for r, used in held:
        led.settle(r, used, 0.0, 1000.0)
    for account in ["global", "tenant:a", "tenant:b", "tenant:c", "user:a/u1", "user:b/u2"]:
        u = led.usage(account)
        assert u is None or (u.reserved_tokens == 0 and u.reserved_usd == 0)


client_failures = st.lists(st.one_of(
    st.tuples(st.sampled_from(["rejected", "invalid", "client_closed"]), st.floats(0, 1e5)),
    st.tuples(st.just("timeout"), st.floats(0, 99.9))),  # too short to say anything about the upstream
    min_size=1, max_size=60)


@SETTINGS
@given(failures=client_failures)
def test_no_sequence_of_client_caused_failures_moves_the_ladder(gateway, failures):
    async def feed():
        gw = gateway.gateway
        rt = gw.rt
        gw.ladder.samples.clear()
        for kind, window_ms in failures:
            gw._attempts(rt, CALL, RequestState.empty()).failed(Attempt("active", window_ms, 16, None), kind,
                                                                time.perf_counter(), "client's doing", window_ms / 1000)
        gw._apply(gw.ladder.evaluate(gw.clock()))
        return gw.ladder.level, len(gw.ladder.samples)

    level, samples = gateway.call(feed())
    assert level == Level.NORMAL and samples == 0


def test_the_same_feed_of_upstream_failures_does_move_it(serve):
    """The control: the property above would fail if the ladder ignored everything."""
    srv = serve(base_manifest(ladder=LADDER))

    async def feed():
        gw = srv.gateway
        for _ in range(5):
            gw._attempts(gw.rt, CALL, RequestState.empty()).failed(Attempt("active", 500, 16, None), "error",
                                                                   time.perf_counter(), "upstream 503", 0.5)
        gw._apply(gw.ladder.evaluate(gw.clock()))
        return gw.ladder.level

    assert srv.call(feed()) == Level.BREAKER
