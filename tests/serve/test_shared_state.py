"""Replicas sharing budgets and rate limits through Redis (serving.state), and what a replica does
when Redis is gone.

The fast tests run the Lua scripts on fakeredis (which runs real Lua); the ones that claim the
multi-replica behaviour start a real `redis-server` and real `quantgate serve` processes on
loopback, and are skipped (with the reason) where redis-server is not installed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import time
import uuid

import aiohttp
import pytest

from gwkit import GatewayProcess, RedisServer, base_manifest, metric, write
from quantgate.serve.limits import Limited, TenantLimiter
from quantgate.serve.manifest import BudgetsSpec, ManifestError, RateSpec, StateSpec, parse_manifest
from quantgate.serve.metrics import GatewayMetrics
from quantgate.serve.state import Held, LocalState, RedisState, Unavailable
from quantgate.serve.tenants import Ledger, OverBudget

fakeredis = pytest.importorskip("fakeredis", reason="fakeredis (the `test` extra) runs the Lua scripts in memory")

BUDGETS = BudgetsSpec.model_validate({"tenants": {"acme": {"tokens": 100, "period_s": 3600}},
                                      "global": {"tokens": 1000, "usd": 1.0, "period_s": 3600}})
NOW = 0.0  # set by `_this_hour` when each test starts


@pytest.fixture(autouse=True)
def _this_hour():
    """Redis expires budget keys on its own (real) clock, a minute after their window ends, so every
    test's wall time is the start of the hour it runs in: a window stays alive for the test's whole
    run. Taken at import instead, a suite that crossed the hour found its keys already expired."""
    global NOW
    NOW = time.time() // 3600 * 3600 + 1.0


def aio(fn):
    """Run an async test on its own event loop (the suite has no asyncio plugin)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return run


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def redis_state(server=None, rates=None, on_down="open", budgets=BUDGETS):
    server = server or fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    clock = Clock()
    st = RedisState(StateSpec(redis="redis://unused", on_redis_down=on_down, retry_s=1.0), Ledger(budgets),
                    TenantLimiter(rates or {}), GatewayMetrics(), clock=clock, client=client)
    return st, server, clock


@aio
async def test_redis_reserve_refuses_once_used_and_reserved_reach_the_budget():
    st, _, _ = redis_state()
    held = [await st.admit("acme", None, 30, 0.0, NOW, 0) for _ in range(4)]
    assert all(isinstance(h, Held) for h in held[:4])  # 0, 30, 60, 90 < 100 when each was admitted
    over = await st.admit("acme", None, 30, 0.0, NOW, 0)
    assert isinstance(over, OverBudget) and over.account == "tenant:acme"
    assert "120 reserved" in over.used and over.reset_at == (NOW // 3600 + 1) * 3600
    for h in held:
        st.settle(h, 10, 0.0, NOW)  # each used less than it reserved
    await st.drain()
    again = await st.admit("acme", None, 30, 0.0, NOW, 0)  # 40 used, nothing reserved
    assert isinstance(again, Held)


@aio
async def test_redis_and_local_give_the_same_verdicts_for_the_same_sequence():
    """One set of rules: the Lua scripts decide like the in-memory ledger and buckets."""
    rates = {"acme": RateSpec(requests_per_s=2, burst=3, tokens_per_min=600)}
    red, _, _ = redis_state(rates=rates)
    loc = LocalState(Ledger(BUDGETS), TenantLimiter(rates))
    seq = [(20, 0.0), (20, 0.1), (20, 0.2), (20, 0.3), (700, 1.0), (20, 1.5), (20, 2.0), (20, 60.0)]
    kinds = []
    for tokens, dt in seq:
        a = await red.admit("acme", "u1", tokens, 0.0, NOW + dt, 0)
        b = await loc.admit("acme", "u1", tokens, 0.0, NOW + dt, dt)
        kinds.append((type(a).__name__, type(b).__name__))
        assert type(a) is type(b), (tokens, dt, a, b)
        if isinstance(a, Limited):
            assert (a.limit, a.retry_after_s) == (b.limit, b.retry_after_s)
        if isinstance(a, Held):
            red.settle(a, tokens, 0.0, NOW + dt)
            loc.settle(b, tokens, 0.0, NOW + dt)
            await red.drain()
    assert {"Held", "Limited", "OverBudget"} <= {k for k, _ in kinds}, kinds


@aio
async def test_usd_budget_in_redis():
    st, _, _ = redis_state(budgets=BudgetsSpec.model_validate({"global": {"usd": 0.001}}))
    h = await st.admit("t", None, 5, 0.0006, NOW, 0)
    assert isinstance(h, Held)
    st.settle(h, 5, 0.0011, NOW)
    await st.drain()
    over = await st.admit("t", None, 5, 0.0006, NOW, 0)
    assert isinstance(over, OverBudget) and over.used.startswith("$0.001100/$0.001000")


@aio
async def test_redis_down_open_serves_with_local_limits_then_recovers_and_replays_settles():
    st, server, clock = redis_state()
    h = await st.admit("acme", None, 30, 0.0, NOW, 0)
    server.connected = False                        # Redis goes away
    st.settle(h, 25, 0.0, NOW)                      # this settle cannot be sent: kept for later
    await st.drain()
    assert not st.up and st.status()["serving_with"] == "local budgets and rate limits"
    local = [await st.admit("acme", None, 30, 0.0, NOW, 0) for _ in range(5)]
    assert [type(x).__name__ for x in local] == ["Held"] * 4 + ["OverBudget"]  # the local ledger's own budget
    assert all(x.local is not None for x in local[:4])
    m = st.metrics.render().decode()
    assert 'quantgate_shared_state_up{backend="redis"} 0.0' in m
    server.connected = True
    assert not st.up                                # not retried before retry_s
    clock.t = 1.5
    await st.probe()                                # /readyz probes: back, and the settle is replayed
    await st.drain()
    assert st.up and 'quantgate_shared_state_up{backend="redis"} 1.0' in st.metrics.render().decode()
    usage = await st.redis.hgetall(f"quantgate:budget:tenant:acme:{int(NOW // 3600 * 3600)}")
    assert int(usage[b"t"]) == 25 and int(usage[b"rt"]) == 0
    for x in local[:4]:                             # local reservations settle locally
        st.settle(x, 1, 0.0, NOW)
    assert st.ledger.usage("tenant:acme").reserved_tokens == 0


@aio
async def test_redis_down_closed_refuses_budgeted_requests_only():
    st, server, _ = redis_state(on_down="closed",
                                budgets=BudgetsSpec.model_validate({"tenants": {"acme": {"tokens": 100}}}))
    server.connected = False
    assert isinstance(await st.admit("acme", None, 10, 0.0, NOW, 0), Unavailable)
    assert isinstance(await st.admit("other", None, 10, 0.0, NOW, 0), Held)  # draws on no budget


def test_state_spec_is_validated():
    with pytest.raises(ManifestError, match="on_redis_down"):
        parse_manifest(json.dumps(base_manifest(state={"redis": "redis://x:1", "on_redis_down": "maybe"})), "m.json")
    with pytest.raises(ManifestError, match="redis"):
        parse_manifest(json.dumps(base_manifest(state={"redis": "http://x:1"})), "m.json")


# ---------------------------------------------------------------------- real redis-server, real replicas
@pytest.fixture()
def redis_server(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    r = RedisServer(binary, tmp_path).start()
    yield r
    r.stop()


@aio
async def test_a_redis_that_stops_answering_costs_one_timeout_then_the_local_path(redis_server):
    """A real redis-server frozen mid-service (SIGSTOP): the round trip in flight times out after
    timeout_ms, the request is decided locally, and a probe after retry_s finds Redis back."""
    clock = Clock()
    st = RedisState(StateSpec(redis=redis_server.url, on_redis_down="open", timeout_ms=200, retry_s=1.0),
                    Ledger(BUDGETS), TenantLimiter({}), GatewayMetrics(), clock=clock)
    try:
        first = await st.admit("acme", None, 30, 0.0, NOW, 0)
        assert isinstance(first, Held) and first.remote is not None and st.up
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            frozen = await st.admit("acme", None, 30, 0.0, NOW, 0)
            assert isinstance(frozen, Held) and frozen.local is not None and frozen.remote is None
            assert not st.up and "TimeoutError" in st.status()["error"]
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        clock.t = 1.5
        await st.probe()
        assert st.up
        again = await st.admit("acme", None, 30, 0.0, NOW, 0)
        assert isinstance(again, Held) and again.remote is not None
    finally:
        await st.close()


@pytest.fixture()
def shared_redis(tmp_path):
    """(URL, key prefix): the redis-server .ci/run starts (QUANTGATE_TEST_REDIS_URL), under a key prefix
    of this test's own; without it, a server started here."""
    url = os.environ.get("QUANTGATE_TEST_REDIS_URL")
    if url:
        yield url, f"qgtest{uuid.uuid4().hex[:8]}:"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    r = RedisServer(binary, tmp_path).start()
    yield r.url, "quantgate:"
    r.stop()


@pytest.fixture()
def replicas(tmp_path):
    started: list[GatewayProcess] = []

    def _start(manifest: dict, n: int) -> list[GatewayProcess]:
        path = write(tmp_path / "manifest.json", manifest)
        for i in range(n):
            started.append(GatewayProcess(path, tmp_path / f"replica-{i}.log").start())
        return started[-n:]

    yield _start
    for g in started:
        g.stop()


def shared_manifest(redis_url: str, **serving) -> dict:
    m = base_manifest(max_concurrency=256, state={"redis": redis_url, "retry_s": 0.2, **serving.pop("state", {})},
                      **serving)
    m["active"]["provider"]["delay_ms"] = 5  # requests overlap, so reservations are really in flight
    return m


async def _chat(s: aiohttp.ClientSession, url: str, prompt: str) -> tuple[int, dict]:
    async with s.post(url + "/v1/chat/completions", json={
            "model": "any", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}) as r:
        return r.status, await r.json(content_type=None)


@aio
async def test_three_replicas_never_overspend_a_tenant_budget(shared_redis, replicas):
    budget = 3000
    url, prefix = shared_redis
    gws = replicas(shared_manifest(url, state={"prefix": prefix}, budgets={"tenants": {"*": {"tokens": budget}}}), 3)
    used, refusals, statuses = [], [], []

    async def client(k: int, s: aiohttp.ClientSession):
        i = 0
        while True:
            i += 1
            status, body = await _chat(s, gws[(k + i) % 3].url, f"client {k} request {i}")  # spread over all
            statuses.append(status)
            if status == 200:
                used.append(body["usage"]["total_tokens"])
            elif status == 429 and body["error"]["type"] == "budget_exceeded":
                refusals.append(body)
                return
            else:
                raise AssertionError(f"unexpected {status}: {body}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*[client(k, s) for k in range(64)])
    reservation = 16 + 1 + len("client 63 request 9999") // 4  # max_tokens + the prompt's estimate
    assert len(refusals) == 64
    assert sum(used) <= budget + reservation, (sum(used), len(used))
    # and the budget was really spent (a refusal can come while up to 64 reservations are held)
    assert sum(used) >= budget - 64 * reservation, (sum(used), len(used))
    # every replica served and refused some, and what Redis counted is what the clients were told
    import redis

    r = redis.Redis.from_url(url)
    [key] = r.keys(f"{prefix}budget:tenant:default:*")
    deadline = time.monotonic() + 10
    while int(r.hget(key, "rt") or 0) and time.monotonic() < deadline:  # background settles landing
        time.sleep(0.01)
    assert int(r.hget(key, "rt")) == 0 and int(r.hget(key, "t")) == sum(used)
    async with aiohttp.ClientSession() as s:
        for g in gws:
            async with s.get(g.url + "/metrics") as resp:
                text = await resp.text()
            assert metric(text, "quantgate_429_total", reason="budget") >= 1
            assert metric(text, "quantgate_shared_state_up", backend="redis") == 1


@pytest.mark.parametrize("choice", ["open", "closed"])
@aio
async def test_redis_stopped_mid_load_replicas_answer_per_choice_and_recover(redis_server, replicas, choice):
    gws = replicas(shared_manifest(redis_server.url, state={"on_redis_down": choice},
                                   budgets={"tenants": {"*": {"tokens": 10**9}}}), 2)
    # what requests get, by the phase they started in (in the changes between, either answer is right)
    seen: dict[str, list[int]] = {"before": [], "stopping": [], "down": [], "starting": [], "after": []}
    open_ = dict.fromkeys(seen, 0)  # requests still in flight, by the phase they started in
    phase = "before"
    stop = asyncio.Event()

    async def client(k, s):
        i = 0
        while not stop.is_set():
            i += 1
            started_in = phase  # the phase a request started in decides what it should get
            open_[started_in] += 1
            status, _ = await _chat(s, gws[(k + i) % 2].url, f"c{k} r{i}")
            open_[started_in] -= 1
            seen[started_in].append(status)

    async def readyz(s, g):
        async with s.get(g.url + "/readyz") as r:
            return r.status, (await r.json())["shared_state"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        load = [asyncio.create_task(client(k, s)) for k in range(16)]
        while len(seen["before"]) < 50:
            await asyncio.sleep(0.01)
        phase = "stopping"
        while open_["before"]:  # let what started with Redis up finish with it up
            await asyncio.sleep(0.005)
        redis_server.stop()
        for g in gws:  # each replica notices (a request or its own probe) and says so
            while (await readyz(s, g))[1]["up"]:
                await asyncio.sleep(0.02)
            status, st = await readyz(s, g)
            assert status == 200 and st["on_redis_down"] == choice
        phase = "down"
        while len(seen["down"]) < 50:
            await asyncio.sleep(0.01)
        phase = "starting"
        while open_["down"]:  # what started with Redis down is decided with it down (a loaded machine may
            await asyncio.sleep(0.005)  # otherwise admit it after the restart below, and rightly serve it)
        redis_server.start()  # same port
        for g in gws:
            while not (await readyz(s, g))[1]["up"]:
                await asyncio.sleep(0.02)
        phase = "after"
        while len(seen["after"]) < 50:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*load)
        texts = []
        for g in gws:
            async with s.get(g.url + "/metrics") as r:
                texts.append(await r.text())
    assert set(seen["before"]) == {200}, seen["before"]
    assert set(seen["after"]) == {200}, seen["after"]
    down = set(seen["down"])
    assert down == ({200} if choice == "open" else {503}), down
    mode_total = sum(metric(t, "quantgate_shared_state_local_total", mode=choice) for t in texts)
    assert mode_total >= 50


@aio
async def test_a_breaker_one_replica_opens_opens_on_the_others_once(redis_server, tmp_path):
    from quantgate.serve.gateway import Gateway
    from quantgate.serve.ladder import Level

    m = shared_manifest(redis_server.url, ladder={"enabled": True, "breaker_cooldown_s": 30})
    a, b = (Gateway(write(tmp_path / f"m{i}.json", m)) for i in range(2))
    await a.start()
    await b.start()
    try:
        a.replica_id = "replica-a"
        await a._share_breaker(a.ladder.trip(a.clock(), "test: upstream failing"))
        assert a.ladder.level == Level.BREAKER
        await b._share_breaker([])  # b's next ladder tick hears of it
        assert b.ladder.level == Level.BREAKER and b.ladder.route() == "fallback"
        b.ladder._move(b.clock(), Level.HEAVY, "test: b's own probes succeeded")
        await b._share_breaker([])  # the same opening does not trip b again
        assert b.ladder.level == Level.HEAVY
    finally:
        await a.close()
        await b.close()


@aio
async def test_a_reservation_is_settled_by_the_state_that_made_it_after_a_reload_swaps_it():
    red, _, _ = redis_state()
    loc = LocalState(red.ledger, red.limiter)
    held = await red.admit("acme", None, 30, 0.0, NOW, 0)
    held_local = await loc.admit("acme", None, 30, 0.0, NOW, 0)
    held.settle(10, 0.0, NOW)        # the gateway now holds `loc`: the Redis reservation still settles in Redis
    held_local.settle(10, 0.0, NOW)
    await red.drain()
    usage = await red.redis.hgetall(f"quantgate:budget:tenant:acme:{int(NOW // 3600 * 3600)}")
    assert (int(usage[b"t"]), int(usage[b"rt"])) == (10, 0)
    assert red.ledger.usage("tenant:acme").reserved_tokens == 0 and red.ledger.usage("tenant:acme").tokens == 10


# ---------------------------------------------------------------------- a slow Redis (issue 19, finding 4)
def _budget_key(account: str = "tenant:acme") -> str:
    return f"quantgate:budget:{account}:{int(NOW // 3600 * 3600)}"


async def _held(st, account: str = "tenant:acme") -> tuple[int, int]:
    """(used, reserved) tokens of an account in Redis."""
    v = await st.redis.hgetall(_budget_key(account))
    return int(v.get(b"t", 0)), int(v.get(b"rt", 0))


@aio
async def test_a_settle_sent_twice_charges_once_and_a_release_before_its_admit_holds_nothing():
    """The scripts are idempotent by request id: a settle replayed (its first reply came too late)
    changes nothing, and an admit Redis runs only after the gateway released it holds nothing."""
    st, _, _ = redis_state()
    h = await st.admit("acme", None, 30, 0.0, NOW, 0)
    st.settle(h, 10, 0.0, NOW)
    await st.drain()
    st._write(("settle", st._settle_args(*h.remote, h.tokens, h.usd, 10, 0.0)))  # the replay
    await st.drain()
    assert await _held(st) == (10, 0)
    st._rid_prefix, st._rid_n = "late", iter([7])
    keys, _, expire = st._keys("acme", None, NOW)
    st._write(("settle", st._settle_args(keys, "quantgate:rate:tok:acme", -1, expire, "quantgate:res:late7", 30,
                                         0.0, 0, 0.0)))  # the release of a timed-out admit
    await st.drain()
    late = await st.admit("acme", None, 30, 0.0, NOW, 0)  # the same id, run after its release
    assert late.remote is None and await _held(st) == (10, 0)


def _frozen_redis_state(redis_server):
    """A state on the real server, its timeout short, and a way to freeze the server (SIGSTOP) a while."""
    import contextlib

    clock = Clock()
    st = RedisState(StateSpec(redis=redis_server.url, on_redis_down="open", timeout_ms=200, retry_s=1.0),
                    Ledger(BUDGETS), TenantLimiter({}), GatewayMetrics(), clock=clock)

    @contextlib.contextmanager
    def frozen():
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)

    async def back():  # after retry_s, a probe finds it back and replays what waited
        clock.t = 1.5
        await st.probe()
        await st.drain()
        assert st.up

    return st, frozen, back


@aio
async def test_an_admit_that_answers_after_the_timeout_is_released_once_redis_is_back(redis_server):
    """A real redis-server frozen (SIGSTOP) while an admit is in flight: the gateway decides locally
    after timeout_ms, Redis runs the admit when it resumes, and that reservation used to stay until
    the window's key expired (the tenant locked out up to a day)."""
    st, frozen, back = _frozen_redis_state(redis_server)
    try:
        first = await st.admit("acme", None, 30, 0.0, NOW, 0)
        with frozen():
            assert (await st.admit("acme", None, 40, 0.0, NOW, 0)).local is not None
        await back()
        assert await _held(st) == (0, 30)  # only the first request's reservation
        st.settle(first, 10, 0.0, NOW)
        await st.drain()
        assert await _held(st) == (10, 0)
    finally:
        await st.close()


@aio
async def test_a_settle_whose_reply_came_too_late_is_replayed_without_charging_twice(redis_server):
    """The audit: a 10-token request charged 20 (the settle ran, its reply timed out, it was replayed)."""
    st, frozen, back = _frozen_redis_state(redis_server)
    try:
        h = await st.admit("acme", None, 30, 0.0, NOW, 0)
        with frozen():
            st.settle(h, 10, 0.0, NOW)
            await st.drain()  # its round trip times out: kept to replay
            assert not st.up
        await back()
        assert await _held(st) == (10, 0)
    finally:
        await st.close()


@aio
async def test_cache_entries_ride_the_states_batches_on_a_real_redis(redis_server):
    """Replicas sharing state share the cache through the state's own client: a store goes out with
    the settles (one pipeline), a lookup with the admits; both reach a real redis-server intact."""
    from quantgate.serve.cache import make_cache
    from quantgate.serve.manifest import CacheSpec

    spec = StateSpec(redis=redis_server.url, prefix=f"qg-cache-{uuid.uuid4().hex[:8]}:")
    st = RedisState(spec, Ledger(BUDGETS), TenantLimiter({}), GatewayMetrics())
    cache = make_cache(CacheSpec(ttl_s=60), spec, st)
    try:
        value = {"text": "héllo ✓", "tokens_in": 3, "tokens_out": 2, "finish_reason": "stop"}
        held = await st.admit("acme", None, 5, 0.0, NOW, 0)
        held.settle(4, 0.0, NOW)
        cache.put_soon("k1", value)
        await st.drain()
        assert await cache.lookup("k1") == value and await cache.lookup("k2") is None
        assert 0 < await st.redis.pttl(f"{spec.prefix}cache:k1") <= 60_000
        used = await st.redis.hget(f"{spec.prefix}budget:tenant:acme:{int(NOW // 3600 * 3600)}", "t")
        assert int(used) == 4  # the settle in the same batch as the store
    finally:
        await st.close()


@aio
async def test_an_admitted_request_reads_its_cache_entry_inside_the_admit_script():
    """With the cache on the state's Redis the admit script reads the entry itself, once the request
    is admitted: no GET of its own in the batch, and nothing read for a request the budget refuses."""
    from types import SimpleNamespace

    from quantgate.serve.cache import make_cache
    from quantgate.serve.guards import budget_cache
    from quantgate.serve.ladder import Level
    from quantgate.serve.manifest import CacheSpec, Deployment, ServingSpec
    from quantgate.serve.records import ChatCall, GatewayError, RequestState

    st, _, _ = redis_state()
    cache = make_cache(CacheSpec(ttl_s=60), st.spec, st)
    sent = []
    call_soon = st._call
    st._call = lambda cmd: (sent.append(cmd[0]), call_soon(cmd))[1]
    dep = Deployment(name="m")
    env = SimpleNamespace(state=st, cache=cache, wall=lambda: NOW, clock=lambda: 0.0, metrics=GatewayMetrics(),
                          ladder=SimpleNamespace(level=Level.NORMAL))
    rt = SimpleNamespace(serving=ServingSpec(), active=dep)

    def ctx(reserved=40):
        c = RequestState.empty()
        c.lookup, c.tokens_in, c.max_tokens, c.reserved_tokens, c.budget_ms = dep, 8, 32, reserved, 1000
        return c

    def call():
        return ChatCall("openai", "t1", "acme", None, [{"role": "user", "content": "same"}], 0.0)

    first = ctx()
    assert await budget_cache.take(env, rt, call(), first) is None and first.reservation.read
    del sent[:]  # the first admit also loaded the scripts (a fresh Redis answers NOSCRIPT once)
    cache.put_soon(first.key, {"text": "cached ✓", "tokens_in": 8, "tokens_out": 2, "finish_reason": "stop"})
    first.reservation.settle(10, 0.0, NOW)
    await st.drain()
    hit = await budget_cache.take(env, rt, call(), second := ctx())
    assert (hit.text, hit.cached) == ("cached ✓", True) and second.reservation is not None
    assert sent == ["EVALSHA"]  # the admit, with its lookup inside: no GET of its own
    second.reservation.settle(95, 0.0, NOW)  # (a hit is free; this one spent the tenant's 100 tokens)
    await st.drain()
    with pytest.raises(GatewayError) as refused:  # 105 used of 100: refused, its entry not read
        await budget_cache.take(env, rt, call(), ctx())
    assert refused.value.status == 429 and sent == ["EVALSHA"] * 2
