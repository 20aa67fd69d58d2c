"""Each gateway guard alone (serve/guards/): a test builds only what that guard reads (a serving
spec, the collaborator it uses, the request) and no server or clock; then the order, and that
what the guards took is given back on every way a request ends (a real Gateway in process, no
HTTP: mock providers)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from gwkit import Counting, base_manifest, write
from quantgate.serve import guards
from quantgate.serve.admission import ConcurrencyGate
from quantgate.serve.budget import Estimator
from quantgate.serve.cache import MemoryCache
from quantgate.serve.gateway import Gateway
from quantgate.serve.guards import budget_cache, concurrency, input_size, request_limits, tenant_slot
from quantgate.serve.ladder import Level
from quantgate.serve.limits import TenantLimiter
from quantgate.serve.manifest import BudgetsSpec, Deployment, RateSpec, ServingSpec
from quantgate.serve.metrics import GatewayMetrics
from quantgate.serve.records import ChatCall, GatewayError, RequestState
from quantgate.serve.state import LocalState
from quantgate.serve.tenants import Ledger

PROMPT = [{"role": "user", "content": "x" * 400}]  # about 100 tokens


def call(messages=PROMPT, **kw) -> ChatCall:
    return ChatCall("chat", "t1", "acme", "u1", messages, 100.0, **kw)


def runtime(fallback=None, **serving) -> SimpleNamespace:
    """What the guards read of a runtime: its serving spec, deployments and providers."""
    active = Deployment(name="primary")
    return SimpleNamespace(serving=ServingSpec(**serving), active=active, fallback=fallback, providers={})


def limited(ctx: RequestState, max_tokens: int = 16, budget_ms: int = 1000) -> RequestState:
    """A state past the first guards (their outcome as fields), for the guards further down."""
    ctx.max_tokens, ctx.budget_ms, ctx.deadline = max_tokens, budget_ms, time.perf_counter() + budget_ms / 1000
    return ctx


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------ 1: request limits
def test_request_limits_fill_in_the_defaults_and_the_deadline():
    ctx = RequestState.empty()
    run(request_limits.take(None, runtime(default_budget_ms=800, default_max_tokens=32), call(), ctx))
    assert (ctx.budget_ms, ctx.max_tokens, ctx.deadline) == (800, 32, 100.8)


@pytest.mark.parametrize("asked, field", [({"budget_ms": 5001}, "budget_ms"), ({"max_tokens": 129}, "max_tokens")])
def test_request_limits_refuse_what_is_over_the_gateways_limit_naming_the_field(asked, field):
    with pytest.raises(GatewayError) as e:
        run(request_limits.take(None, runtime(max_budget_ms=5000, max_tokens_limit=128, default_max_tokens=64),
                                call(**asked), RequestState.empty()))
    assert (e.value.status, e.value.param) == (400, field) and "more than this gateway allows" in str(e.value)


# ------------------------------------------------------------------------------ 2: input size
def engine_dep(name: str, cap: int) -> SimpleNamespace:
    """What the input cap reads of a deployment whose engine takes at most `cap` prompt tokens."""
    return SimpleNamespace(name=name, key=f"{name}@1", max_input_tokens=cap, max_tokens=None,
                           engine=SimpleNamespace(max_model_len=cap))


def ladder_at(level=Level.NORMAL):
    return SimpleNamespace(ladder=SimpleNamespace(level=level))


def test_a_prompt_over_the_gateways_cap_is_refused_on_the_estimate_without_a_tokenizer():
    rt = runtime(max_input_tokens=50)
    rt.active = engine_dep("primary", 1000)
    rt.providers["active"] = tok = Counting(10)
    with pytest.raises(GatewayError) as e:
        run(input_size.take(ladder_at(), rt, call(), limited(RequestState.empty())))
    assert e.value.status == 413 and "about 105 tokens" in str(e.value) and tok.asked == 0


def test_the_engines_cap_is_checked_on_the_exact_count_and_sets_what_is_reserved():
    rt = runtime()
    rt.active = engine_dep("primary", 60)
    rt.providers["active"] = Counting(70)
    with pytest.raises(GatewayError) as e:
        run(input_size.take(ladder_at(), rt, call(), limited(RequestState.empty())))
    assert e.value.status == 413 and "70 tokens (its tokenizer)" in str(e.value) and "max_model_len=60" in str(e.value)
    rt.providers["active"] = Counting(40)
    ctx = limited(RequestState.empty(), max_tokens=16)
    run(input_size.take(ladder_at(), rt, call(), ctx))
    assert (ctx.lookup, ctx.tokens_in, ctx.reserved_tokens) == (rt.active, 40, 56)


def test_while_the_breaker_is_open_the_fallback_is_what_is_looked_up_and_measured():
    rt = runtime(fallback=engine_dep("fallback", 1000))
    rt.active = engine_dep("primary", 1000)
    rt.providers = {"active": Counting(1), "fallback": Counting(7)}
    ctx = limited(RequestState.empty())
    run(input_size.take(ladder_at(Level.BREAKER), rt, call(), ctx))
    assert ctx.lookup is rt.fallback and ctx.tokens_in == 7
    assert input_size.prompt_tokens(PROMPT) == 105


# ------------------------------------------------------------------------------ 3: tenant slot
def test_a_tenant_over_its_share_is_refused_and_its_slot_given_back_once():
    env = SimpleNamespace(limiter=TenantLimiter({"*": RateSpec(concurrency_share=0.5)}), clock=lambda: 0.0,
                          metrics=GatewayMetrics())
    rt, first, second = runtime(max_concurrency=2), RequestState.empty(), RequestState.empty()
    run(tenant_slot.take(env, rt, call(), first))
    assert first.tenant_slot
    with pytest.raises(GatewayError) as e:
        run(tenant_slot.take(env, rt, call(), second))
    assert (e.value.status, e.value.type, e.value.extra) == (429, "rate_limited", {"limit": "concurrency_share"})
    assert not second.tenant_slot and env.metrics.throttled.labels("concurrency_share")._value.get() == 1
    tenant_slot.give_back(env, call(), second)  # took nothing: gives nothing
    tenant_slot.give_back(env, call(), first)
    tenant_slot.give_back(env, call(), first)  # once only
    run(tenant_slot.take(env, rt, call(), RequestState.empty()))
    with pytest.raises(GatewayError):
        run(tenant_slot.take(env, rt, call(), RequestState.empty()))


# ------------------------------------------------------------------------------ 4: budget and cache
def budget_env(tokens: int | None = None, cache=None):
    budgets = BudgetsSpec(tenants={"*": {"tokens": tokens}}) if tokens is not None else BudgetsSpec()
    ledger = Ledger(budgets)
    return SimpleNamespace(state=LocalState(ledger, TenantLimiter({})), ledger=ledger, cache=cache, wall=lambda: 1000.0,
                           clock=lambda: 0.0, metrics=GatewayMetrics(), ladder=SimpleNamespace(level=Level.NORMAL))


def admitted_ctx(rt, reserved: int = 50) -> RequestState:
    ctx = limited(RequestState.empty())
    ctx.lookup, ctx.tokens_in, ctx.reserved_tokens = rt.active, reserved - ctx.max_tokens, reserved
    return ctx


def test_a_reservation_is_held_until_given_back_with_what_was_used():
    env, rt = budget_env(tokens=1000), runtime()
    ctx = admitted_ctx(rt)
    assert run(budget_cache.take(env, rt, call(), ctx)) is None
    assert env.ledger.usage("tenant:acme").reserved_tokens == 50
    ctx.used_tokens = 30
    budget_cache.give_back(env, call(), ctx)
    budget_cache.give_back(env, call(), ctx)  # a reservation settles once
    u = env.ledger.usage("tenant:acme")
    assert (u.reserved_tokens, u.tokens) == (0, 30)


def test_over_budget_is_refused_without_a_reservation_and_the_cache_lookup_is_closed():
    class Lookup:
        closed = False

        def close(self):
            self.closed = True

    env, rt = budget_env(tokens=40), runtime()
    run(budget_cache.take(env, rt, call(), admitted_ctx(rt)))  # holds 50 of the tenant's 40 tokens
    pending = Lookup()
    env.cache = SimpleNamespace(lookup=lambda key: pending, peek_key=lambda key: None)
    ctx = admitted_ctx(rt)
    with pytest.raises(GatewayError) as e:
        run(budget_cache.take(env, rt, call(), ctx))
    assert (e.value.status, e.value.type) == (429, "budget_exceeded") and "Retry-After" in e.value.headers
    assert ctx.reservation is None and pending.closed and ctx.key is not None


def test_a_cache_hit_answers_after_the_budget_check_and_a_miss_goes_on():
    cache = MemoryCache(ttl_s=60, max_entries=10, clock=lambda: 0.0)
    env, rt = budget_env(cache=cache), runtime()
    ctx = admitted_ctx(rt)
    assert run(budget_cache.take(env, rt, call(), ctx)) is None  # a miss
    assert env.metrics.for_deployment(rt.active).cache_miss.v == 1
    cache.put_now(ctx.key, {"text": "cached", "tokens_in": 5, "tokens_out": 2, "finish_reason": "stop"})
    again = admitted_ctx(rt)
    hit = run(budget_cache.take(env, rt, call(), again))
    assert (hit.text, hit.cached, hit.path, hit.deployment) == ("cached", True, ["cache"], rt.active)
    assert again.reservation is not None  # held until the request ends, settled with nothing used


# ------------------------------------------------------------------------------ 5: concurrency
def gate_env(limit=1, queue=0):
    return SimpleNamespace(gate=ConcurrencyGate(limit, queue), estimator=Estimator(), metrics=GatewayMetrics())


def test_no_slot_and_no_queue_room_is_a_429_with_retry_after():
    env, rt = gate_env(), runtime()
    first, second = limited(RequestState.empty()), limited(RequestState.empty())
    run(concurrency.take(env, rt, call(), first))
    assert first.slot and first.t_admit > 0 and env.gate.in_flight == 1
    with pytest.raises(GatewayError) as e:
        run(concurrency.take(env, rt, call(), second))
    assert (e.value.status, e.value.type, e.value.headers) == (429, "overloaded", {"Retry-After": "2"})
    concurrency.give_back(env, call(), second)
    concurrency.give_back(env, call(), first)
    concurrency.give_back(env, call(), first)
    assert env.gate.in_flight == 0 and not first.slot


def test_a_queued_request_gets_the_slot_given_back_and_a_cancelled_one_holds_none():
    env, rt = gate_env(queue=2), runtime(queue={"size": 2, "max_wait_ms": 5000})

    async def main():
        first, queued, cancelled = (limited(RequestState.empty(), budget_ms=5000) for _ in range(3))
        await concurrency.take(env, rt, call(), first)
        waiting = asyncio.ensure_future(concurrency.take(env, rt, call(), queued))
        leaving = asyncio.ensure_future(concurrency.take(env, rt, call(), cancelled))
        await asyncio.sleep(0)
        assert env.gate.queued == 2
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        concurrency.give_back(env, call(), first)
        await waiting
        assert queued.slot and not cancelled.slot and env.gate.in_flight == 1

    run(main())


# ------------------------------------------------------------------------------ the order, and giving back
def test_the_guards_run_cheapest_first_and_give_back_last_taken_first():
    assert [g.name for g in guards.GUARDS] == ["request_limits", "input_size", "tenant_slot", "budget_cache",
                                              "concurrency"]
    assert guards._GIVE_BACKS == (concurrency.give_back, budget_cache.give_back, tenant_slot.give_back)


@pytest.fixture
def gateway(tmp_path):
    """A real Gateway in this test's event loop (mock providers): the guards with every collaborator."""
    def make(**serving):
        return Gateway(write(tmp_path / "manifest.json", base_manifest(**serving)))
    return make


def taken(gw) -> tuple:
    """What requests hold: gateway slots, the tenant's slots, reserved budget tokens."""
    t = gw.limiter._t.get("acme")
    u = gw.ledger.usage("tenant:acme")
    return gw.gate.in_flight, t.in_flight if t else 0, u.reserved_tokens if u else 0


BUDGET = {"budgets": {"tenants": {"*": {"tokens": 10**6}}}, "tenant_limits": {"*": {"concurrency_share": 0.5}},
          "max_concurrency": 4, "queue": {"size": 4, "max_wait_ms": 5000}}


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_every_way_a_request_ends_gives_back_what_the_guards_took(gateway, stream):
    async def ask(gw, c):
        if not stream:
            return await gw.chat(c)
        events = [ev async for ev in gw.chat_stream(c)]  # to its end, as the HTTP layer reads it
        assert events[-1][0] == "end"
        return events[-1][1]

    async def main():
        gw = gateway(**BUDGET)
        await gw.start()
        try:
            c = lambda **kw: ChatCall("chat", "t", "acme", "u1", [{"role": "user", "content": "hi"}],
                                      time.perf_counter(), **kw)
            assert (await ask(gw, c())).cached is False          # answered
            assert (await ask(gw, c())).cached is True           # a cache hit
            assert taken(gw) == (0, 0, 0)
            for bad in ({"budget_ms": 10**6}, {"max_tokens": 10**6}):  # refused by the first guard
                with pytest.raises(GatewayError):
                    await ask(gw, c(**bad))
            hold = gw.rt.providers["active"].hold = asyncio.Event()
            held = [asyncio.ensure_future(ask(gw, c(max_tokens=n))) for n in (1, 2)]   # the tenant's two slots
            await asyncio.sleep(0.05)
            assert taken(gw)[:2] == (2, 2) and taken(gw)[2] > 0
            with pytest.raises(GatewayError) as e:                # refused by its share: the third guard
                await ask(gw, c(max_tokens=3))
            assert e.value.status == 429
            held[0].cancel()                                      # cancelled mid-attempt
            await asyncio.gather(held[0], return_exceptions=True)
            assert taken(gw)[:2] == (1, 1)
            hold.set()
            await held[1]
            assert taken(gw) == (0, 0, 0)
        finally:
            await gw.close()

    run(main())
