"""Response cache for repeated requests: TTL and size bound, keyed by request and deployment.

The key is a hash of the normalised request (messages with whitespace collapsed, the sampling
parameters that change the answer, the seed), the tenant (unless the deployment's answers are
marked shareable) and the deployment's identity (name, model version, checksum),
so a promote or rollback never serves an answer the other model gave. Only complete answers are
stored; degraded or truncated ones are not (a later request with more budget deserves better).

Memory (LRU + TTL, clock injected) by default; Redis when several replicas should share it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Callable

def normalise_text(s: str) -> str:
    return " ".join(s.split())


def cache_key(deployment_key: str, messages: list[dict[str, str]], max_tokens: int,
              temperature: float | None = None, top_p: float | None = None,
              stop: list[str] | None = None, seed: int | None = None, scope: str | None = None,
              ignore_eos: bool = False) -> str:
    """Everything that changes the answer, and who may see it: `scope` is the tenant (None only for
    a deployment whose answers the manifest marks shareable), so one tenant never receives another
    tenant's answer, nor learns from a cache hit that someone else asked the same thing."""
    # repr of a tuple of str/int/float/None is unambiguous (quoted, escaped) and cheaper than JSON
    body = repr((scope, deployment_key, tuple((m["role"], normalise_text(m["content"])) for m in messages),
                 max_tokens, temperature, top_p, tuple(stop) if stop else None, seed, ignore_eos))
    return hashlib.sha256(body.encode()).hexdigest()


def cache_scope(scope: str, tenant: str, user: str | None, key_id: str | None) -> str:
    """Who may see one request's cached answer (serving.cache.scope): 'key' (the default) the callers of
    its API key (anonymous: its tenant), 'user' its tenant's user (the key's bound user or the body's;
    none: the tenant), 'tenant' every caller of its tenant. Pure."""
    if scope == "key" and key_id is not None:
        return f"{tenant}#{key_id}"
    if scope != "tenant" and user:
        return f"{tenant}/{user}"
    return tenant


class MemoryCache:
    """LRU with a per-entry expiry; `now` is injectable so expiry is testable without waiting."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._d: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get_now(self, key: str, now: float | None = None) -> Any | None:
        item = self._d.get(key)
        if item is None:
            return None
        now = self.clock() if now is None else now
        if item[0] <= now:
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return item[1]

    def put_now(self, key: str, value: Any, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self._d[key] = (now + self.ttl_s, value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    async def get(self, key: str) -> Any | None:
        return self.get_now(key)

    def peek_key(self, key: str) -> None:
        """In memory there is no Redis key for the admit script to read: look it up (`lookup`)."""
        return None

    def lookup(self, key: str):
        """Start a lookup now, await it later (in memory it is done at once)."""
        return self.get(key)

    async def put(self, key: str, value: Any) -> None:
        self.put_now(key, value)

    def put_soon(self, key: str, value: Any) -> None:
        """Store without making the answer wait (in memory that is simply now)."""
        self.put_now(key, value)

    async def close(self) -> None:
        self._d.clear()


class RedisCache:
    """Shared cache for several replicas; values are JSON, expiry is Redis's own (SET EX)."""

    def __init__(self, url: str, ttl_s: float, prefix: str = "quantgate:cache:", state=None):
        from ..errors import require

        aioredis = require("redis.asyncio", what="the redis cache backend", extra="redis")
        # with the replicas' shared state on the same Redis: its client, and its batched writes
        self._state = state
        self._r = state.redis if state is not None else aioredis.from_url(url, socket_timeout=0.5,
                                                                             socket_connect_timeout=0.5)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.prefix = prefix
        self._pending: set[asyncio.Task] = set()

    def lookup(self, key: str):
        """Start a lookup now and await it later. With the shared state the gateway does not look up:
        the admit script reads the entry (`peek_key`)."""
        return self.get(key)

    def peek_key(self, key: str) -> str | None:
        """The Redis key the shared state's admit script reads for this entry, in the same script and
        only once the request is admitted (state.RedisState.admit's `peek`): one command per request
        fewer than a lookup of its own. None when this cache has its own client: `lookup` it."""
        return self.prefix + key if self._state is not None else None

    @staticmethod
    def decode(raw) -> Any | None:
        """A stored entry as it came from Redis (None: absent)."""
        return None if raw is None or isinstance(raw, Exception) else json.loads(raw)

    async def get(self, key: str) -> Any | None:
        try:
            raw = await self._r.get(self.prefix + key)
        except Exception:
            return None  # a cache that is down is a miss, never a failed request
        return self.decode(raw)

    async def put(self, key: str, value: Any) -> None:
        try:
            await self._r.set(self.prefix + key, json.dumps(value), px=self.ttl_ms)
        except Exception:
            pass

    def put_soon(self, key: str, value: Any) -> None:
        """Store in the background: the answer does not wait for Redis."""
        if self._state is not None:
            self._state.store_soon(self.prefix + key, json.dumps(value), self.ttl_ms)
            return
        task = asyncio.get_running_loop().create_task(self.put(key, value))
        self._pending.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        if self._state is None:  # a shared client is the state's to close
            await self._r.aclose()


def make_cache(spec, state=None, shared_state=None) -> MemoryCache | RedisCache | None:
    """From a manifest CacheSpec (and StateSpec: replicas sharing a Redis share the cache too by
    default, through the state's client when it is the same Redis); None when caching is off."""
    if not spec.enabled:
        return None
    shared = state is not None and state.redis
    if spec.backend == "redis" or (spec.backend is None and shared):
        url = spec.url or state.redis
        same = shared and url == state.redis and getattr(shared_state, "kind", None) == "redis"
        return RedisCache(url, spec.ttl_s, prefix=(state.prefix if shared else "quantgate:") + "cache:",
                          state=shared_state if same else None)
    return MemoryCache(spec.ttl_s, spec.max_entries)
