"""Pure decisions, no server and no clock: admission, ladder, budget plan, cache keys, tenant budgets."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from quantgate.serve.admission import Admit, ConcurrencyGate, decide, effective_limit, retry_after_s
from quantgate.serve.budget import Estimate, Estimator, plan_request, trim_context
from quantgate.serve.cache import MemoryCache, cache_key
from quantgate.serve.ladder import Ladder, Level, Sample, compute_signals, percentile, target_level
from quantgate.serve.manifest import BudgetsSpec, LadderSpec, LevelSpec
from quantgate.serve.schemas import ChatCompletionRequest, ChatRequest, describe
from quantgate.serve.tenants import Ledger, window_start


# ------------------------------------------------------------------ admission
@pytest.mark.parametrize("in_flight,queued,limit,qsize,expected", [
    (0, 0, 2, 0, Admit.NOW), (1, 0, 2, 0, Admit.NOW), (2, 0, 2, 0, Admit.REJECT),
    (2, 0, 2, 1, Admit.QUEUE), (2, 1, 2, 1, Admit.REJECT),
    (1, 1, 2, 4, Admit.QUEUE),  # a free slot but someone waits: no overtaking
])
def test_decide(in_flight, queued, limit, qsize, expected):
    assert decide(in_flight, queued, limit, qsize) is expected


def test_retry_after_and_effective_limit():
    assert retry_after_s(0, 0, 4, 0) == 1                 # never 0: clients would hammer
    assert retry_after_s(8, 0, 4, 1000) == 3              # (8+0+1)/4 waves × 1 s → ceil 2.25
    assert effective_limit(64, 0.5) == 32 and effective_limit(1, 0.25) == 1


def test_gate_hands_slots_in_order_and_times_out():
    async def main():
        g = ConcurrencyGate(1, queue_size=2)
        assert g.try_acquire() is Admit.NOW
        assert g.try_acquire() is Admit.QUEUE
        first = asyncio.ensure_future(g.wait(5))
        await asyncio.sleep(0)
        assert g.try_acquire() is Admit.QUEUE
        second = asyncio.ensure_future(g.wait(5))
        await asyncio.sleep(0)
        assert g.try_acquire() is Admit.REJECT             # queue full
        g.release()
        assert await first is True and not second.done()   # FIFO: the first waiter got the slot
        assert g.in_flight == 1 and g.queued == 1
        g.release()
        assert await second is True
        g.release()
        assert g.in_flight == 0
        # a waiter that times out leaves the queue and holds nothing
        assert g.try_acquire() is Admit.NOW
        assert g.try_acquire() is Admit.QUEUE
        assert await g.wait(0.01) is False
        assert g.queued == 0 and g.in_flight == 1
        g.configure(limit=2, queue_size=0)
        assert g.try_acquire() is Admit.NOW

    asyncio.run(main())


# ------------------------------------------------------------------ ladder
SPEC = LadderSpec(window_s=10, min_samples=4, hold_s=5, breaker_cooldown_s=20, probe_successes=2,
                  light=LevelSpec(p95_ms=100, max_tokens_factor=0.5, context_chars=50),
                  moderate=LevelSpec(p95_ms=200, error_rate=0.2),
                  heavy=LevelSpec(p95_ms=400, error_rate=0.3, concurrency_factor=0.5),
                  breaker=LevelSpec(error_rate=0.6))


def feed(ladder: Ladder, t: float, n: int, latency: float, ok: bool = True):
    for i in range(n):
        ladder.observe(Sample(t + i * 0.001, latency, ok))


def test_signals_and_target():
    samples = [Sample(1, 10, True), Sample(2, 20, False), Sample(3, 30, True), Sample(4, 500, True)]
    sig = compute_signals(samples, now=5, window_s=10)
    assert sig.n == 4 and sig.p95_ms == 500 and sig.error_rate == 0.25
    assert compute_signals(samples, now=13.5, window_s=10).n == 1   # older ones left the window
    assert target_level(sig, SPEC)[0] is Level.HEAVY                # p95 500 ≥ heavy's 400
    assert target_level(compute_signals(samples[:3], 5, 10), SPEC)[0] is Level.NORMAL  # too few samples
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([], 95) == 0.0


def test_cost_rate_is_a_signal_too():
    spec = LadderSpec(window_s=60, min_samples=2, moderate=LevelSpec(cost_usd_per_min=0.5))
    samples = [Sample(t, 10, True, cost_usd=0.2) for t in range(1, 4)]        # $0.6 in a 60 s window
    sig = compute_signals(samples, now=5, window_s=60)
    assert sig.cost_usd_per_min == pytest.approx(0.6)
    level, why = target_level(sig, spec)
    assert level is Level.MODERATE and "cost" in why


def test_ladder_climbs_at_once_and_steps_down_with_hysteresis():
    lad = Ladder(SPEC, now=0)
    feed(lad, 0, 10, latency=150)                    # p95 150: light (100) but not moderate (200)
    [t] = lad.evaluate(1)
    assert (t.frm, t.to) == (Level.NORMAL, Level.LIGHT) and "p95" in t.reason
    assert lad.actions().max_tokens_factor == 0.5 and lad.route() == "active"
    # signals drop to 90 ms: under the trigger, but above 0.8 × 100 → stays (hysteresis)
    feed(lad, 11, 10, latency=90)
    assert lad.evaluate(12) == [] and lad.level is Level.LIGHT
    # calm below 80 ms and hold_s over: one rung down
    feed(lad, 21.5, 10, latency=50)
    [t] = lad.evaluate(22)
    assert (t.frm, t.to) == (Level.LIGHT, Level.NORMAL)


def test_ladder_holds_a_rung_for_hold_s():
    lad = Ladder(SPEC.model_copy(update={"window_s": 2}), now=0)
    feed(lad, 0, 10, latency=150)
    assert lad.evaluate(1)[0].to is Level.LIGHT
    feed(lad, 3.5, 10, latency=50)
    assert lad.evaluate(5.9) == [] and lad.level is Level.LIGHT   # calm, but only 4.9 s at light
    assert lad.evaluate(6.1)[0].to is Level.NORMAL


def test_ladder_steps_down_one_rung_at_a_time():
    lad = Ladder(SPEC, now=0)
    feed(lad, 0, 10, latency=450)
    assert lad.evaluate(1)[0].to is Level.HEAVY      # jumps straight to heavy
    assert lad.actions().concurrency_factor == 0.5
    feed(lad, 20, 10, latency=10)                     # old samples gone, new ones calm
    assert lad.evaluate(21)[0].to is Level.MODERATE
    assert lad.evaluate(22) == []                     # hold_s again before the next step
    assert lad.evaluate(26.5)[0].to is Level.LIGHT


def test_breaker_routes_to_fallback_then_probes_and_recovers():
    lad = Ladder(SPEC, now=0)
    feed(lad, 0, 10, latency=10, ok=False)
    [t] = lad.evaluate(1)
    assert t.to is Level.BREAKER and "error rate" in t.reason
    assert lad.route() == "fallback" and lad.actions() is None
    assert lad.evaluate(10) == []                     # cooling down
    [t] = lad.evaluate(21)
    assert "half-open" in t.reason
    assert lad.route() == "probe" and lad.route() == "fallback"   # one probe at a time
    [t] = lad.probe_done(False, now=21.5)
    assert "re-opened" in t.reason and lad.route() == "fallback"
    assert lad.evaluate(30) == []                     # cooldown restarted at 21.5
    lad.evaluate(42)
    assert lad.route() == "probe"
    assert lad.probe_done(True, now=42.1) == []
    assert lad.route() == "probe"
    [t] = lad.probe_done(True, now=42.2)
    assert (t.frm, t.to) == (Level.BREAKER, Level.HEAVY) and lad.route() == "active"
    assert len(lad.samples) == 0                      # the failures that tripped it are forgotten


def test_an_abandoned_probe_frees_the_slot_without_a_verdict():
    lad = Ladder(SPEC, now=0)
    feed(lad, 0, 10, latency=10, ok=False)
    lad.evaluate(1)
    lad.evaluate(21)
    assert lad.route() == "probe" and lad.route() == "fallback"
    lad.probe_abandoned()
    assert lad.half_open and lad.route() == "probe"


def test_disabled_ladder_never_moves():
    lad = Ladder(SPEC.model_copy(update={"enabled": False}), now=0)
    feed(lad, 0, 10, latency=10, ok=False)
    assert lad.evaluate(1) == [] and lad.level is Level.NORMAL


# ------------------------------------------------------------------ budget plan
def test_plan_exhausted_and_plain():
    assert plan_request(remaining_ms=10, route="active", max_tokens=64, has_fallback=True).exhausted
    p = plan_request(remaining_ms=1000, route="active", max_tokens=64, has_fallback=True, fallback_reserve_ms=200)
    assert [(a.target, a.timeout_ms, a.max_tokens) for a in p.attempts] == [("active", 800, 64), ("fallback", 200, 64)]
    p = plan_request(remaining_ms=1000, route="active", max_tokens=64, has_fallback=False)
    assert [(a.target, a.timeout_ms) for a in p.attempts] == [("active", 1000)]


def test_plan_reserve_is_bounded_by_half_the_budget_and_learns_the_fallback():
    p = plan_request(remaining_ms=100, route="active", max_tokens=8, has_fallback=True, fallback_reserve_ms=500)
    assert p.attempts[0].timeout_ms == 50
    p = plan_request(remaining_ms=1000, route="active", max_tokens=10, has_fallback=True,
                     est_fallback=Estimate(ttft_ms=30, ms_per_token=2))
    assert p.attempts[1].timeout_ms == 75             # (30 + 2 × 10) × 1.5 slack
    p = plan_request(remaining_ms=1000, route="active", max_tokens=10, has_fallback=True, min_attempt_ms=20,
                     est_fallback=Estimate(ttft_ms=1, ms_per_token=0))
    assert p.attempts[1].timeout_ms == 40             # a fast fallback still gets 2 × min_attempt_ms


def test_plan_applies_ladder_rung_and_breaker_route():
    rung = LevelSpec(max_tokens_factor=0.25, context_chars=100)
    p = plan_request(remaining_ms=1000, route="active", max_tokens=64, has_fallback=True, rung=rung)
    assert p.attempts[0].max_tokens == 16 and p.attempts[0].context_chars == 100
    assert any("64→16" in r for r in p.reasons)
    p = plan_request(remaining_ms=1000, route="fallback", max_tokens=64, has_fallback=True)
    assert [a.target for a in p.attempts] == ["fallback"] and "breaker" in p.reasons[0]
    p = plan_request(remaining_ms=1000, route="fallback", max_tokens=64, has_fallback=False)
    assert [a.target for a in p.attempts] == ["active"]


def test_plan_degrades_before_calling_a_too_slow_active():
    slow = Estimate(ttft_ms=100, ms_per_token=10)     # 64 tokens → 740 ms
    p = plan_request(remaining_ms=600, route="active", max_tokens=64, has_fallback=True, est_active=slow,
                     fallback_reserve_ms=100)
    assert p.attempts[0].target == "active" and p.attempts[0].max_tokens == 30   # (500 × 0.8 − 100) / 10
    hopeless = Estimate(ttft_ms=900, ms_per_token=10)
    p = plan_request(remaining_ms=600, route="active", max_tokens=64, has_fallback=True, est_active=hopeless)
    assert [a.target for a in p.attempts] == ["fallback"] and "fallback" in p.reasons[-1]
    p = plan_request(remaining_ms=600, route="probe", max_tokens=64, has_fallback=True, est_active=hopeless)
    assert p.attempts[0].target == "active"          # a probe must reach the active deployment


def test_estimator_and_trim():
    e = Estimator(alpha=0.5, min_samples=2)
    e.observe("d", ttft_ms=10, generation_ms=90, tokens_out=10)
    assert e.get("d") is None
    e.observe("d", ttft_ms=30, generation_ms=90, tokens_out=10)
    assert e.get("d") == Estimate(20, 10)
    assert e.get("other") is None
    assert trim_context("abcdef", 3) == "def" and trim_context("abc", None) == "abc"


# ------------------------------------------------------------------ cache
def test_cache_key_normalises_and_separates_deployments():
    m1 = [{"role": "user", "content": "Hello   world\n"}]
    m2 = [{"role": "user", "content": " Hello world"}]
    assert cache_key("a@1", m1, 16) == cache_key("a@1", m2, 16)
    assert cache_key("a@1", m1, 16) != cache_key("a@2", m1, 16)     # a rollback never sees a's answers
    assert cache_key("a@1", m1, 16) != cache_key("a@1", m1, 32)
    assert cache_key("a@1", m1, 16) != cache_key("a@1", m1, 16, temperature=0.7)
    assert cache_key("a@1", m1, 16) != cache_key("a@1", [{"role": "system", "content": "Hello world"}], 16)


def test_memory_cache_ttl_and_lru():
    c = MemoryCache(ttl_s=10, max_entries=2, clock=lambda: 0.0)
    c.put_now("a", 1, now=0)
    c.put_now("b", 2, now=1)
    assert c.get_now("a", now=5) == 1                 # a is now the most recent
    c.put_now("c", 3, now=6)                          # evicts b, the least recently used
    assert c.get_now("b", now=6) is None and c.get_now("c", now=6) == 3
    assert c.get_now("a", now=10.5) is None           # expired at 10
    assert len(c) == 1


# ------------------------------------------------------------------ tenant budgets
BUDGETS = BudgetsSpec.model_validate({
    "tenants": {"acme": {"tokens": 100, "period_s": 3600}, "*": {"usd": 0.5, "period_s": 60}},
    "per_user": {"tokens": 30, "period_s": 60},
    "global": {"tokens": 1000, "period_s": 86400},
})


def test_ledger_tokens_reset_time_and_window_roll():
    led = Ledger(BUDGETS.model_copy(update={"per_user": None}))
    now = 7200 + 10.0                                  # 10 s into an hour window
    assert led.check("acme", "u1", now) is None
    led.charge("acme", "u1", 100, 0.0, now)
    over = led.check("acme", "u1", now + 5)
    assert over.account == "tenant:acme" and over.used == "100/100 tokens" and over.reset_at == 10800
    assert "resets at 1970-01-01T03:00:00Z (in 3585 s)" in over.message(now + 5)
    assert led.check("acme", "u1", 10800.0) is None    # a new window
    assert window_start(10799.9, 3600) == 7200


def test_ledger_usd_default_tenant_user_and_global():
    led = Ledger(BUDGETS)
    led.charge("beta", "u1", 10, 0.5, 0)               # '*' gives beta its own 0.5 USD / min
    assert led.check("beta", "u2", 1).account == "tenant:beta"
    assert led.check("gamma", "u2", 1) is None         # another tenant, its own account
    led.charge("gamma", "u9", 30, 0.0, 1)
    assert led.check("gamma", "u9", 2).account == "user:gamma/u9"
    assert led.check("gamma", "u8", 2) is None
    led.charge("delta", None, 1000, 0.0, 3)
    assert led.check("zeta", "u1", 4).account == "global"


def test_zero_budget_refuses_at_once():
    led = Ledger(BudgetsSpec.model_validate({"tenants": {"blocked": {"tokens": 0}}}))
    assert led.check("blocked", None, 0).used == "0/0 tokens"


# ------------------------------------------------------------------ request validation
@pytest.mark.parametrize("body,field", [
    (b'{"user_id": "u", "prompt": "x", "budget_ms": -1}', "budget_ms"),
    (b'{"user_id": "u", "prompt": "x", "budget_ms": "soon"}', "budget_ms"),
    (b'{"user_id": "u"}', "prompt"),
    (b'{"user_id": "u", "prompt": "x", "budget": 5}', "budget"),
    (b'{"user_id": "u", "prompt": ', "body"),
    (b'[1, 2]', "body"),
])
def test_chat_request_errors_name_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate_json(body)
    got, msg = describe(e.value)
    assert got == field and msg.startswith(field)


def test_openai_request_errors_name_the_field():
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate_json(b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}')
    assert describe(e.value)[0] == "messages.0.role"
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate_json(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                                                  b'"tools": []}')
    assert "tool calls" in describe(e.value)[1]
    r = ChatCompletionRequest.model_validate_json(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
        b'{"type": "text", "text": "b"}]}], "stop": "x", "temperature": 0}')
    assert r.messages[0].text() == "ab" and r.stop_list() == ["x"]


# ------------------------------------------------------------------ the hand-written JSON of an answer
def test_answer_json_is_valid_for_awkward_values():
    import json

    from quantgate.serve.manifest import Deployment
    from quantgate.serve.records import Answer

    a = Answer('he said "hi"\n\\ ü \x01 \u2028', Deployment(name="m.v-1", model_version="2024:01"), True,
               Level.BREAKER, ["active:timeout", "fallback"], ['budget: "tight"'], 3, 4, 1.5e-12, "length",
               900, queue_ms=0.0004, upstream_ms=12.3456, generation_ms=0, total_ms=1e4)
    info = json.loads(a.info_json("t-1"))
    assert info["degrade"] == {"level": "breaker", "path": ["active:timeout", "fallback"],
                               "reasons": ['budget: "tight"'], "notice": "switched to the stable fallback model"}
    assert info["cost_usd"] == pytest.approx(1.5e-12) and info["cached"] is True
    assert info["latency_ms"] == {"queue": 0.0, "upstream": 12.346, "generation": 0.0, "total": 10000.0}
    assert a.info("t-1") == info
