"""Per-tenant shares: concurrent slots, a request rate and a token rate (token buckets).

One tenant must not be able to take every slot or every second of the upstream: each tenant may
hold at most `concurrency_share` of max_concurrency at once, and may spend requests and tokens
only as fast as its buckets refill. A refusal names the limit and says when to retry.

`take` is the pure token-bucket step; `TenantLimiter` keeps one small record per tenant that has
been seen recently (least recently used records are dropped past `max_tenants`, in O(1)).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from .manifest import RateSpec

DEFAULT = RateSpec()
SHARED_DEFAULT = 0.5  # a tenant's share of the slots, unless set, where the key table names several tenants


def share_of(spec: RateSpec, tenants: int) -> float:
    """Pure: the fraction of max_concurrency a tenant may hold: its own `concurrency_share`, else
    SHARED_DEFAULT when the gateway serves two or more tenants (one tenant could otherwise take every
    slot and lock the others out), else 1 (a gateway with one tenant: its own gate decides)."""
    if spec.concurrency_share is not None:
        return spec.concurrency_share
    return SHARED_DEFAULT if tenants >= 2 else 1.0


def take(level: float, last: float, now: float, rate: float, capacity: float,
         cost: float) -> tuple[bool, float, float]:
    """One token-bucket step: (allowed, level after, seconds until `cost` would be allowed).

    The bucket holds `level` at time `last`, refills at `rate` per second up to `capacity`;
    a request that costs more than the bucket holds is refused and takes nothing. A cost larger
    than the capacity is charged as a full bucket, so a large request is slow but never refused
    for ever.
    """
    level = min(capacity, level + max(0.0, now - last) * rate)
    cost = min(cost, capacity)
    if level >= cost:
        return True, level - cost, 0.0
    return False, level, (cost - level) / rate if rate > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Limited:
    limit: str              # 'concurrency_share', 'requests_per_s' or 'tokens_per_min'
    retry_after_s: int
    message: str


class _Tenant:
    __slots__ = ("in_flight", "req", "req_t", "tok", "tok_t")

    def __init__(self, spec: RateSpec, now: float):
        self.in_flight = 0
        self.req, self.req_t = float(_burst(spec)), now
        self.tok, self.tok_t = float(spec.tokens_per_min or 0), now


def _burst(spec: RateSpec) -> float:
    if spec.requests_per_s is None:
        return 0.0
    return float(spec.burst or max(1, math.ceil(2 * spec.requests_per_s)))


class TenantLimiter:
    def __init__(self, specs: dict[str, RateSpec], max_tenants: int = 100_000, tenants: int = 0):
        self.specs, self.max_tenants, self.tenants = specs, max_tenants, tenants
        self._t: OrderedDict[str, _Tenant] = OrderedDict()

    def configure(self, specs: dict[str, RateSpec], tenants: int = 0) -> None:
        """The limits, and how many tenants the key table names (what an unset share defaults on)."""
        self.specs, self.tenants = specs, tenants

    def spec(self, tenant: str) -> RateSpec:
        return self.specs.get(tenant) or self.specs.get("*") or DEFAULT

    def _get(self, tenant: str, spec: RateSpec, now: float) -> _Tenant:
        t = self._t.get(tenant)
        if t is None:
            t = self._t[tenant] = _Tenant(spec, now)
            if len(self._t) > self.max_tenants:
                self._evict()
        else:
            self._t.move_to_end(tenant)
        return t

    def _evict(self) -> None:
        # the least recently seen tenant without a request in flight (its slots must stay counted)
        for name, t in self._t.items():
            if t.in_flight == 0:
                del self._t[name]
                return

    def admit(self, tenant: str, tokens: int, max_concurrency: int, now: float) -> Limited | None:
        """Take one slot, one request and `tokens` from the tenant's share; or say which limit refused."""
        return self.take_slot(tenant, max_concurrency, now) or self.take_rate(tenant, tokens, now, slot_taken=True)

    def take_slot(self, tenant: str, max_concurrency: int, now: float) -> Limited | None:
        """The tenant's share of this gateway's slots (always per replica: slots are local)."""
        spec = self.spec(tenant)
        t = self._get(tenant, spec, now)
        share = share_of(spec, self.tenants)
        slots = max(1, math.floor(max_concurrency * share))
        if share < 1 and t.in_flight >= slots:  # at 1 the gateway's own gate decides
            return Limited("concurrency_share", 1, f"tenant {tenant!r} has {t.in_flight} requests in flight, its "
                           f"share of this gateway (concurrency_share={share}); retry after "
                           "one finishes")
        t.in_flight += 1
        return None

    def take_rate(self, tenant: str, tokens: int, now: float, slot_taken: bool = False) -> Limited | None:
        """One request and `tokens` from the tenant's buckets (a refusal frees a slot just taken)."""
        spec = self.spec(tenant)
        t = self._get(tenant, spec, now)
        limited = refused(tenant, spec, *self._step(t, spec, tokens, now))
        if limited is not None and slot_taken:
            t.in_flight = max(0, t.in_flight - 1)
        return limited

    @staticmethod
    def _step(t: _Tenant, spec: RateSpec, tokens: int, now: float) -> tuple[str | None, float]:
        if spec.requests_per_s is not None:
            ok, level, wait = take(t.req, t.req_t, now, spec.requests_per_s, _burst(spec), 1)
            if not ok:
                t.req, t.req_t = level, now
                return "requests_per_s", wait
        else:
            level = 0.0
        if spec.tokens_per_min is not None:
            ok, tok, wait = take(t.tok, t.tok_t, now, spec.tokens_per_min / 60, spec.tokens_per_min, tokens)
            t.tok, t.tok_t = tok, now
            if not ok:
                return "tokens_per_min", wait
        if spec.requests_per_s is not None:
            t.req, t.req_t = level, now
        return None, 0.0

    def release(self, tenant: str, reserved_tokens: int = 0, used_tokens: int = 0) -> None:
        """The request ended: free its slot; give back the tokens reserved but not used."""
        t = self._t.get(tenant)
        if t is None:
            return
        t.in_flight = max(0, t.in_flight - 1)
        self.refund(tenant, reserved_tokens, used_tokens)

    def refund(self, tenant: str, reserved_tokens: int, used_tokens: int) -> None:
        t = self._t.get(tenant)
        spec = self.spec(tenant)
        if t is not None and spec.tokens_per_min is not None and reserved_tokens > used_tokens:
            t.tok = min(float(spec.tokens_per_min), t.tok + reserved_tokens - used_tokens)

    def in_flight(self, tenant: str) -> int:
        t = self._t.get(tenant)
        return t.in_flight if t is not None else 0


def refused(tenant: str, spec: RateSpec, limit: str | None, wait_s: float) -> Limited | None:
    """The client's message for a bucket that refused (None when none did); shared by every backend."""
    if limit == "requests_per_s":
        return Limited(limit, max(1, math.ceil(wait_s)),
                       f"tenant {tenant!r} is over its request rate (requests_per_s={spec.requests_per_s})")
    if limit == "tokens_per_min":
        return Limited(limit, max(1, math.ceil(wait_s)),
                       f"tenant {tenant!r} is over its token rate (tokens_per_min={spec.tokens_per_min})")
    return None


def burst(spec: RateSpec) -> float:
    return _burst(spec)
