"""Where the gateway keeps budgets and rate buckets: in this process, or in Redis for every replica.

The reserve/settle rules are the ledger's (tenants.py) and the bucket step is limits.py's `take`;
this module only decides *where* they run. `LocalState` is the single-replica behaviour: the
`Ledger` and the `TenantLimiter` buckets in memory. `RedisState` runs the same rules as two Lua
scripts, so a check-and-reserve over every account a request draws on (global, tenant, user) and
both of its buckets is one atomic script shared by all replicas, and a settle is a second one,
sent in the background (the answer does not wait for it).

Round trips are batched: the commands issued in one event-loop turn (admits, each reading its cache
entry) go out as one pipeline, and background writes (settles, cache stores) queue while a batch is
in flight and go in the next. Each script stays atomic on its own; under load many requests share a
round trip (bench/replicas.py counts them). The breaker signal is shared too: a replica that opens
its breaker says so for one cool-down, and the others open theirs once per opening.

Budget windows are keys named by their start, so a period's reset is the key changing (the old
one expires a minute after its window ends). A request is settled in the window it was admitted in.

When Redis does not answer (down, or slower than `timeout_ms`), the replica keeps serving by the
manifest's `on_redis_down`: `open` decides with its own local ledger and buckets (each replica then
enforces the limits on its own, so together they may let through up to N times a budget); `closed`
refuses requests that draw on a budget (503) and serves the rest with local rate limits. It tries
Redis again at most every `retry_s` (one request or /readyz probe at a time), and settles that could
not be sent are replayed when it is back. Reserve and settle are idempotent by request id (the
scripts' mark), so a settle whose reply came too late is replayed without charging twice, and an
admit that timed out here but ran on Redis is released (a settle of nothing, queued like the
others): its reservation does not lock the tenant out until the window's key expires. The tenant's
share of concurrent slots stays per replica: slots are this process's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from .limits import Limited, TenantLimiter, burst, refused
from .manifest import StateSpec
from .redis_pack import fast_packing
from .tenants import Ledger, OverBudget, Reservation, window_start

log = logging.getLogger("quantgate.serve")

_KEEP_S = 60  # a budget window's key outlives its window by this much (settles of late answers)
_TOMBSTONE_S = 600  # a request released before Redis ran its admit: that admit holds nothing this long
CANARY_TIMEOUT_S = 2.0  # a canary claim waits this long for Redis (a background decision, not a request)

# Each script's ARGV arrives as one space-separated string (`_evalsha`): redis-py encodes every
# argument of a command in Python, and one string instead of two dozen numbers per request was the
# largest cut in the gateway's CPU per request with shared state (bench/replicas.py).
WORDS = """
local function words(s)
  local out = {}
  for w in string.gmatch(s, '%S+') do out[#out + 1] = w end
  return out
end
"""

# Both scripts are idempotent by request id: the admit that holds a reservation marks it in the
# request's own key (KEYS' last: '1' while held); a settle releases only a reservation still marked
# (and unmarks it), so a settle replayed after a reply that came too late charges nothing twice. A
# settle that finds no mark leaves a short tombstone ('0'), so an admit of that id that Redis runs
# later still (it was sent before a timeout, and the gateway has released it since) holds nothing.

# KEYS: n budget accounts (one hash per window: t, u used; rt, ru reserved), the request bucket,
# the token bucket, the request's mark, and optionally a key to read once admitted (the request's
# cache entry: a lookup in the same script instead of a command of its own). ARGV: n, tokens, usd,
# now, then (limit_tokens, limit_usd, expire_at) per account (-1 = no limit), then req rate, req
# capacity, token rate, token capacity (-1 = no bucket), bucket ttl, the mark's expire_at.
ADMIT = """
local ARGV = words(ARGV[1])
local n = tonumber(ARGV[1])
local tokens, usd, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local mark = KEYS[n + 3]
if redis.call('EXISTS', mark) == 1 then return {3} end
for i = 1, n do
  local lt, lu = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local v = redis.call('HMGET', KEYS[i], 't', 'u', 'rt', 'ru')
  local t, u = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  local rt, ru = tonumber(v[3] or '0'), tonumber(v[4] or '0')
  if lt >= 0 and t + rt >= lt then return {1, i, 'tokens', tostring(t), tostring(rt)} end
  if lu >= 0 and u + ru >= lu then return {1, i, 'usd', tostring(u), tostring(ru)} end
end
local b = 5 + 3 * n
local rr, rc, tr, tc, ttl = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]),
                            tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
local function step(key, rate, cap, cost)
  local v = redis.call('HMGET', key, 'l', 'ts')
  local level, last = tonumber(v[1] or tostring(cap)), tonumber(v[2] or ARGV[4])
  level = math.min(cap, level + math.max(0, now - last) * rate)
  cost = math.min(cost, cap)
  if level >= cost then return true, level - cost, 0 end
  if rate > 0 then return false, level, (cost - level) / rate end
  return false, level, 1e9
end
local function store(key, level)
  redis.call('HSET', key, 'l', tostring(level), 'ts', ARGV[4])
  redis.call('EXPIRE', key, ttl)
end
local req_level
if rr >= 0 then
  local ok, level, wait = step(KEYS[n + 1], rr, rc, 1)
  if not ok then store(KEYS[n + 1], level); return {2, 'requests_per_s', tostring(wait)} end
  req_level = level
end
if tr >= 0 then
  local ok, level, wait = step(KEYS[n + 2], tr, tc, tokens)
  store(KEYS[n + 2], level)
  if not ok then return {2, 'tokens_per_min', tostring(wait)} end
end
if rr >= 0 then store(KEYS[n + 1], req_level) end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'rt', tokens)
  redis.call('HINCRBYFLOAT', KEYS[i], 'ru', ARGV[3])
  redis.call('EXPIREAT', KEYS[i], ARGV[4 + 3 * i])
end
redis.call('SET', mark, '1')
redis.call('EXPIREAT', mark, ARGV[b + 5])
if KEYS[n + 4] then return {0, redis.call('GET', KEYS[n + 4])} end
return {0}
"""

# KEYS: n budget accounts, the token bucket, the request's mark. ARGV: n, reserved tokens, reserved
# usd, used tokens, used usd, token capacity (-1 = no bucket), then expire_at per account.
SETTLE = """
local ARGV = words(ARGV[1])
local n = tonumber(ARGV[1])
local mark = KEYS[n + 2]
if redis.call('GET', mark) ~= '1' then
  redis.call('SET', mark, '0', 'EX', TOMBSTONE_S)
  return 1
end
redis.call('DEL', mark)
local rt, ru, t, u, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
                          tonumber(ARGV[6])
for i = 1, n do
  if redis.call('HINCRBY', KEYS[i], 'rt', -rt) < 0 then redis.call('HSET', KEYS[i], 'rt', 0) end
  if tonumber(redis.call('HINCRBYFLOAT', KEYS[i], 'ru', -ru)) < 0 then redis.call('HSET', KEYS[i], 'ru', 0) end
  redis.call('HINCRBY', KEYS[i], 't', t)
  redis.call('HINCRBYFLOAT', KEYS[i], 'u', u)
  redis.call('EXPIREAT', KEYS[i], ARGV[6 + i])
end
if cap >= 0 and rt > t and redis.call('EXISTS', KEYS[n + 1]) == 1 then
  local level = tonumber(redis.call('HGET', KEYS[n + 1], 'l') or '0')
  redis.call('HSET', KEYS[n + 1], 'l', tostring(math.min(cap, level + rt - t)))
end
return 0
""".replace("TOMBSTONE_S", str(_TOMBSTONE_S))


@dataclass(slots=True)
class Unavailable:
    """on_redis_down=closed and Redis does not answer: a budgeted request is refused (503)."""

    retry_after_s: float
    message: str = ("budgets are shared by the gateway's replicas and their store does not answer; "
                    "this gateway refuses budgeted requests until it is back (on_redis_down=closed)")


@dataclass(slots=True)
class Held:
    """What an admitted request holds until it is settled: a local reservation or a Redis one."""

    tenant: str
    tokens: int
    usd: float
    local: Reservation | None = None
    remote: tuple | None = None   # (account keys, token bucket key, token capacity, expire_at per account, mark)
    backend: "LocalState | None" = None  # who settles it: a reload may swap the state meanwhile
    settled: bool = field(default=False)
    read: bool = False  # whether the admit read the key it was asked to peek at (Redis did the admit)
    peeked: bytes | None = None  # that key's value (None: absent)

    def settle(self, tokens: int, usd: float, wall: float) -> None:
        self.backend.settle(self, tokens, usd, wall)


class LocalState:
    """Today's single-replica behaviour: the ledger and the buckets in this process."""

    kind = "local"

    def __init__(self, ledger: Ledger, limiter: TenantLimiter):
        self.ledger, self.limiter = ledger, limiter

    async def admit(self, tenant: str, user_id: str | None, tokens: int, usd: float, wall: float,
                    mono: float, peek: str | None = None) -> Held | OverBudget | Limited | Unavailable:
        """Reserve, or say why not. `peek`: a Redis key the shared state reads in the same script once
        the request is admitted (Held.read, Held.peeked); here there is no Redis, and nothing is read."""
        return self.admit_now(tenant, user_id, tokens, usd, wall, mono)

    def admit_now(self, tenant, user_id, tokens, usd, wall, mono) -> Held | OverBudget | Limited:
        r = self.ledger.reserve(tenant, user_id, tokens, usd, wall)
        if isinstance(r, OverBudget):
            return r
        limited = self.limiter.take_rate(tenant, tokens, mono)
        if limited is not None:
            self.ledger.settle(r, 0, 0.0, wall)
            return limited
        return Held(tenant, tokens, usd, local=r, backend=self)

    def settle(self, held: Held, tokens: int, usd: float, wall: float) -> None:
        """Replace the reservation by what the request cost; once (later calls do nothing)."""
        if held.settled:
            return
        held.settled = True
        self.ledger.settle(held.local, tokens, usd, wall)
        self.limiter.refund(held.tenant, held.tokens, tokens)

    def status(self) -> dict:
        return {"backend": "local"}

    async def publish_breaker(self, deployment: str, event: str, ttl_s: float) -> None:
        return None

    async def breaker_event(self, deployment: str) -> str | None:
        return None

    async def claim_canary(self, step_key: str, decision: str, ttl_s: float) -> str | None:
        return decision  # alone, this replica's decision is the decision

    async def canary_decision(self, step_key: str) -> str | None:
        return None

    async def probe(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisState(LocalState):
    """Budgets and buckets in Redis for every replica; the local ones stand in while it is down."""

    kind = "redis"

    def __init__(self, spec: StateSpec, ledger: Ledger, limiter: TenantLimiter, metrics=None,
                 clock=time.monotonic, client=None):
        from ..errors import require

        super().__init__(ledger, limiter)
        aioredis = require("redis.asyncio", what="shared gateway state (serving.state.redis)", extra="redis")
        self.exceptions = require("redis.exceptions", what="shared gateway state", extra="redis")
        self.spec, self.metrics, self.clock = spec, metrics, clock
        if client is None:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # A slow Redis costs one timeout, then the local path (a timed-out script may have run:
            # never resend it). The timeout is this class's, one per round trip (`_bounded`): the
            # client's own socket_timeout would arm one per reply, and a batch has dozens (that cost
            # the gateway 20 us of CPU per request, bench/replicas.py). A closed connection is retried
            # once at once: after Redis restarts, the pool's old connections fail once each, and that
            # is not Redis being down.
            client = aioredis.from_url(spec.redis, socket_timeout=None, socket_connect_timeout=spec.timeout_ms / 1000,
                                       retry=Retry(NoBackoff(), 1, supported_errors=(self.exceptions.ConnectionError,)),
                                       health_check_interval=0)
            fast_packing(client.connection_pool)  # serve/redis_pack.py: a command packed in one C call
        self.redis = client
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        # request ids for the scripts' idempotency: a random prefix per process and a counter
        self._rid_prefix, self._rid_n = os.urandom(6).hex(), itertools.count(1)
        self._calls: list[tuple[tuple, asyncio.Future]] = []  # commands waiting for the next batch
        self._batch_soon = False
        self.up = True
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._next_try = 0.0
        self._unsettled: deque[tuple] = deque(maxlen=100_000)  # settles to replay when Redis is back
        self._pending: set[asyncio.Task] = set()
        self._queue: list[tuple[str, tuple]] = []  # background writes waiting for the next batch
        self._flusher: asyncio.Task | None = None
        if metrics is not None:
            metrics.state_up.labels("redis").set(1)

    # ------------------------------------------------------------------ availability
    def trip(self, op: str) -> None:
        """Count one round trip to Redis (admit, writes, cache_get, breaker, ping)."""
        if self.metrics is not None:
            self.metrics.redis_round_trips.labels(op).inc()

    def _errors(self) -> tuple:
        return (self.exceptions.RedisError, OSError, asyncio.TimeoutError)

    async def _bounded(self, aw, timeout_s: float | None = None):
        """One round trip, or asyncio.TimeoutError after timeout_ms (Redis counts as down). Cancelled
        mid-reply, the client closes that connection rather than reuse it."""
        async with asyncio.timeout(self.spec.timeout_ms / 1000 if timeout_s is None else timeout_s):
            return await aw

    def _use_redis(self) -> bool:
        if self.up:
            return True
        now = self.clock()
        if now < self._next_try:
            return False
        self._next_try = now + self.spec.retry_s  # one try per interval; the others stay local
        return True

    def _down(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._next_try = self.clock() + self.spec.retry_s
        if self.up:
            self.up, self.down_since = False, self.clock()
            self._spawn(self._drop_connections())
            if self.metrics is not None:
                self.metrics.state_up.labels("redis").set(0)
            log.error("shared state: Redis does not answer (%s); serving with %s until it does",
                      self.last_error, "local limits" if self.spec.on_redis_down == "open"
                      else "budgeted requests refused")

    async def _drop_connections(self) -> None:
        """Close the pool's idle connections: they point at a Redis that is gone."""
        try:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001 - best effort; a stale connection is retried once anyway
            pass

    def _up(self) -> None:
        if self.up:
            return
        self.up, self.down_since, self.last_error = True, None, None
        if self.metrics is not None:
            self.metrics.state_up.labels("redis").set(1)
        log.warning("shared state: Redis answers again; budgets and rate limits are shared again "
                    "(%d settles to replay)", len(self._unsettled))
        while self._unsettled:
            self._write(("settle", self._unsettled.popleft()))

    def status(self) -> dict:
        out = {"backend": "redis", "up": self.up, "on_redis_down": self.spec.on_redis_down}
        if not self.up:
            out["down_for_s"] = round(self.clock() - self.down_since, 1)
            out["serving_with"] = ("local budgets and rate limits" if self.spec.on_redis_down == "open"
                                   else "budgeted requests refused; local rate limits")
            out["error"] = self.last_error
        return out

    async def probe(self) -> None:
        """While down, try Redis (at most every retry_s) so recovery is seen without traffic."""
        if self.up or not self._use_redis():
            return
        self.trip("ping")
        try:
            await self._bounded(self.redis.ping())
        except self._errors() as exc:
            self._down(exc)
        else:
            self._up()

    # ------------------------------------------------------------------ batched calls
    async def _script(self, name: str, keys: list, args: list):
        """Run a script, batched with the other calls made in the same event-loop turn: under load
        many requests share one pipeline (one round trip), each script still atomic on its own."""
        for again in (False, True):
            try:
                out = await self._call(self._evalsha(name, keys, args))
            except self.exceptions.NoScriptError as exc:
                out = exc
            if not _noscript(out) or again:
                break
            await self._load_scripts()  # a new or restarted Redis has no scripts yet: load, send again
        if isinstance(out, Exception):
            raise out
        return out

    def _evalsha(self, name: str, keys: list, args: list) -> tuple:
        return ("EVALSHA", self._sha[name], len(keys), *keys, " ".join(map(str, args)))

    async def _load_scripts(self) -> None:
        for name, src in SCRIPTS.items():
            self._sha[name] = await self._bounded(self.redis.script_load(src))

    def _call(self, cmd: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.add_done_callback(_retrieved)  # a caller that gave up need not read a failure
        self._calls.append((cmd, fut))
        if not self._batch_soon:
            self._batch_soon = True
            loop.call_soon(self._send_batch)
        return fut

    def _send_batch(self) -> None:
        self._batch_soon = False
        calls, self._calls = self._calls, []
        if calls:
            self._spawn(self._execute(calls))

    async def _execute(self, calls: list[tuple[tuple, asyncio.Future]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for cmd, _ in calls:
            pipe.execute_command(*cmd)
        self.trip("batch")
        try:
            out = await self._bounded(pipe.execute(raise_on_error=False))
        except BaseException as exc:  # noqa: BLE001 - every waiting request hears of it (and goes local)
            for _, fut in calls:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), r in zip(calls, out):
            if not fut.done():
                fut.set_result(r)  # a command's own error comes back as its result

    # ------------------------------------------------------------------ breaker signal
    async def publish_breaker(self, deployment: str, event: str, ttl_s: float) -> None:
        """Tell the other replicas this one opened the breaker on `deployment` (for one cool-down)."""
        if not self._use_redis():
            return
        self.trip("breaker")
        try:
            await self._bounded(self.redis.set(f"{self.spec.prefix}breaker:{deployment}", event,
                                               px=max(1, int(ttl_s * 1000))))
        except self._errors() as exc:
            self._down(exc)
        else:
            self._up()

    async def breaker_event(self, deployment: str) -> str | None:
        """The breaker another replica opened on `deployment` within its cool-down, if any."""
        return await self._signal("breaker", f"{self.spec.prefix}breaker:{deployment}")

    async def _signal(self, op: str, key: str) -> str | None:
        """A value one replica left for the others (a GET), or None: absent, or Redis down."""
        if not self._use_redis():
            return None
        self.trip(op)
        try:
            got = await self._bounded(self.redis.get(key))
        except self._errors() as exc:
            self._down(exc)
            return None
        self._up()
        return None if got is None else _s(got)

    # ------------------------------------------------------------------ canary decisions
    async def claim_canary(self, step_key: str, decision: str, ttl_s: float) -> str | None:
        """The one decision about a canary step: `decision` if no replica decided this step first (SET NX),
        else the one that did. None when Redis cannot be asked (down, or no answer within
        CANARY_TIMEOUT_S): the caller must not take a step or promote alone then, since another
        replica may be deciding otherwise. A claim whose reply was lost may still have landed: the next
        one reads it back as the decision, which is this replica's own."""
        if not self._use_redis():
            return None
        k = f"{self.spec.prefix}canary:{step_key}"
        bound = max(self.spec.timeout_ms / 1000, CANARY_TIMEOUT_S)  # off the request path: wait longer
        self.trip("canary")
        try:
            if await self._bounded(self.redis.set(k, decision, nx=True, px=max(1, int(ttl_s * 1000))), bound):
                self._up()
                return decision
            self.trip("canary")
            got = await self._bounded(self.redis.get(k), bound)
        except self._errors() as exc:
            self._down(exc)
            return None
        self._up()
        return None if got is None else _s(got)  # expired between the two calls: ask again next tick

    async def canary_decision(self, step_key: str) -> str | None:
        """The decision another replica took about this canary step, if any."""
        return await self._signal("canary", f"{self.spec.prefix}canary:{step_key}")

    # ------------------------------------------------------------------ admit / settle
    def _keys(self, tenant: str, user_id: str | None, wall: float) -> tuple[list, list, list]:
        keys, limits, expire = [], [], []
        p = self.spec.prefix
        for account, spec in self.ledger.accounts(tenant, user_id):
            start = int(window_start(wall, spec.period_s))
            keys.append(f"{p}budget:{account}:{start}")
            limits.append((spec.tokens if spec.tokens is not None else -1,
                           repr(spec.usd) if spec.usd is not None else -1))
            expire.append(start + spec.period_s + _KEEP_S)
        return keys, limits, expire

    async def admit(self, tenant: str, user_id: str | None, tokens: int, usd: float, wall: float,
                    mono: float, peek: str | None = None) -> Held | OverBudget | Limited | Unavailable:
        if not self._use_redis():
            return self._local(tenant, user_id, tokens, usd, wall, mono)
        keys, limits, expire = self._keys(tenant, user_id, wall)
        rate = self.limiter.spec(tenant)
        p = self.spec.prefix
        bucket_keys = [f"{p}rate:req:{tenant}", f"{p}rate:tok:{tenant}"]
        rr = rate.requests_per_s if rate.requests_per_s is not None else -1
        tr = rate.tokens_per_min / 60 if rate.tokens_per_min is not None else -1
        tc = rate.tokens_per_min if rate.tokens_per_min is not None else -1
        args: list = [len(keys), tokens, repr(float(usd)), repr(wall)]
        for (lt, lu), e in zip(limits, expire):
            args += [lt, lu, e]
        mark = f"{p}res:{self._rid_prefix}{next(self._rid_n):x}"
        args += [rr, burst(rate) if rr != -1 else -1, tr, tc, 120, max(expire, default=int(wall) + 3600)]
        try:
            out = await self._script("admit", keys + bucket_keys + [mark] + ([peek] if peek else []), args)
        except self._errors() as exc:
            self._down(exc)
            # the script may have run after all (a reply slower than timeout_ms): release whatever it
            # held, by its id, once Redis answers again (a no-op if it never ran, and it never will)
            self._write(("settle", self._settle_args(keys, bucket_keys[1], tc, expire, mark, tokens, usd, 0, 0.0)))
            return self._local(tenant, user_id, tokens, usd, wall, mono)
        self._up()
        code = int(out[0])
        if code == 1:
            i, what, used, held = int(out[1]) - 1, _s(out[2]), float(out[3]), float(out[4])
            account, spec = self.ledger.accounts(tenant, user_id)[i]
            start = window_start(wall, spec.period_s)
            if what == "tokens":
                text = f"{int(used)}/{spec.tokens} tokens" + (f", {int(held)} reserved" if held else "")
            else:
                text = f"${used:.6f}/${spec.usd:.6f}" + (f", ${held:.6f} reserved" if held else "")
            return OverBudget(account, text, start + spec.period_s)
        if code == 2:
            return refused(tenant, rate, _s(out[1]), float(out[2]))
        if code == 3:  # an id already released: cannot happen for a fresh id; decide here rather than guess
            return self._local(tenant, user_id, tokens, usd, wall, mono)
        return Held(tenant, tokens, usd, remote=(keys, bucket_keys[1], tc, expire, mark), backend=self,
                    read=peek is not None, peeked=out[1] if peek is not None and len(out) > 1 else None)

    @staticmethod
    def _settle_args(keys, bucket, cap, expire, mark, held_tokens, held_usd, tokens, usd) -> tuple:
        return (keys + [bucket, mark], [len(keys), held_tokens, repr(float(held_usd)), tokens, repr(float(usd)), cap,
                                        *expire])

    def _local(self, tenant, user_id, tokens, usd, wall, mono) -> Held | OverBudget | Limited | Unavailable:
        mode = self.spec.on_redis_down
        if self.metrics is not None:
            self.metrics.state_local.labels(mode).inc()
        if mode == "closed" and self.ledger.accounts(tenant, user_id):
            return Unavailable(self.spec.retry_s)
        return self.admit_now(tenant, user_id, tokens, usd, wall, mono)

    def settle(self, held: Held, tokens: int, usd: float, wall: float) -> None:
        if held.remote is None:
            return super().settle(held, tokens, usd, wall)
        if held.settled:
            return
        held.settled = True
        self._write(("settle", self._settle_args(*held.remote, held.tokens, held.usd, tokens, usd)))

    def store_soon(self, key: str, value: str, ttl_ms: int) -> None:
        """A cache entry, written with the next batch (the answer does not wait for Redis)."""
        self._write(("set", (key, value, ttl_ms)))

    def _write(self, item: tuple[str, tuple]) -> None:
        self._queue.append(item)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send what is queued as one pipeline; what queues meanwhile goes in the next one. Under
        load many requests' settles and cache stores share one round trip."""
        while self._queue:
            batch, self._queue = self._queue, []
            settles = [a for kind, a in batch if kind == "settle"]
            if not self._use_redis():
                self._unsettled.extend(settles)  # cache stores are simply dropped
                continue
            pipe = self.redis.pipeline(transaction=False)
            for kind, a in batch:
                if kind == "settle":
                    pipe.execute_command(*self._evalsha("settle", *a))
                else:
                    pipe.execute_command("SET", a[0], a[1], "PX", a[2])  # not pipe.set: no argument parsing
            self.trip("writes")
            try:
                out = await self._bounded(pipe.execute(raise_on_error=False))
            except self.exceptions.NoScriptError:
                out = [self.exceptions.NoScriptError()] * len(batch)
            except self._errors() as exc:
                self._unsettled.extend(settles)
                self._down(exc)
                continue
            self._up()
            if any(_noscript(r) for r in out):  # Redis restarted empty: load the scripts, send again
                await self._load_scripts()
                self._queue[:0] = [(kind, a) for (kind, a), r in zip(batch, out) if _noscript(r)]

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for the settles and stores in flight (tests and shutdown)."""
        while self._pending or (self._flusher is not None and not self._flusher.done()):
            await asyncio.gather(*list(self._pending), *([self._flusher] if self._flusher else []),
                                 return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self.redis.aclose()


SCRIPTS = {"admit": WORDS + ADMIT, "settle": WORDS + SETTLE}


def _retrieved(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _noscript(r) -> bool:
    """Whether a reply is Redis saying it has not got the script (a new or restarted Redis). Called
    on every reply of a batch: nothing but the type check for the replies that are not errors."""
    if not isinstance(r, Exception):
        return False
    from redis.exceptions import NoScriptError

    return isinstance(r, NoScriptError) or str(r).startswith("NOSCRIPT")


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def make_state(spec: StateSpec, ledger: Ledger, limiter: TenantLimiter, metrics=None) -> LocalState:
    if spec.redis:
        return RedisState(spec, ledger, limiter, metrics)
    return LocalState(ledger, limiter)
