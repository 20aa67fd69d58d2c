"""Budgets per tenant, per user and global: tokens and/or USD per period, with a reset time.

Periods are fixed windows aligned to multiples of `period_s` on the wall clock (a daily budget
resets at 00:00 UTC), so the reset time a client is told is exact and the same on every replica.
A request is refused when an account it draws on is already spent; what it then costs is charged
after it is answered (the real tokens, not a guess), so one request may overshoot a budget by its
own size — the price of not refusing requests on estimates.

Pure: every method takes `now` (epoch seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

from .manifest import BudgetsSpec, BudgetSpec

DEFAULT_TENANT = "default"


@dataclass(slots=True)
class Usage:
    window_start: float
    tokens: int = 0
    usd: float = 0.0


@dataclass(frozen=True, slots=True)
class OverBudget:
    account: str          # 'global', 'tenant:acme' or 'user:acme/u1'
    used: str             # e.g. '10234/10000 tokens'
    reset_at: float       # epoch seconds

    def message(self, now: float) -> str:
        when = datetime.fromtimestamp(self.reset_at, timezone.utc).isoformat().replace("+00:00", "Z")
        return (f"{self.account} is over budget ({self.used} this period); "
                f"resets at {when} (in {max(0, math.ceil(self.reset_at - now))} s)")

    @property
    def reset_iso(self) -> str:
        return datetime.fromtimestamp(self.reset_at, timezone.utc).isoformat().replace("+00:00", "Z")


def window_start(now: float, period_s: int) -> float:
    return math.floor(now / period_s) * period_s


def check_one(account: str, spec: BudgetSpec, usage: Usage | None, now: float) -> OverBudget | None:
    start = window_start(now, spec.period_s)
    if usage is None or usage.window_start != start:
        usage = Usage(start)  # nothing spent in this window yet
    reset = start + spec.period_s
    if spec.tokens is not None and usage.tokens >= spec.tokens:
        return OverBudget(account, f"{usage.tokens}/{spec.tokens} tokens", reset)
    if spec.usd is not None and usage.usd >= spec.usd:
        return OverBudget(account, f"${usage.usd:.6f}/${spec.usd:.6f}", reset)
    return None


class Ledger:
    """Usage per account for the current window; survives manifest reloads (same object)."""

    def __init__(self, spec: BudgetsSpec, max_accounts: int = 100_000):
        self.spec = spec
        self.max_accounts = max_accounts
        self._usage: dict[str, Usage] = {}
        self._shared: dict[str, list] = {}  # tenant → its global and tenant accounts (asked twice a request)

    def configure(self, spec: BudgetsSpec) -> None:
        self.spec = spec
        self._shared = {}

    def accounts(self, tenant: str, user_id: str | None) -> list[tuple[str, BudgetSpec]]:
        """The accounts a request draws on, most general first."""
        out = self._shared.get(tenant)
        if out is None:
            out = []
            if self.spec.global_ is not None:
                out.append(("global", self.spec.global_))
            t = self.spec.tenants.get(tenant) or self.spec.tenants.get("*")
            if t is not None:
                out.append((f"tenant:{tenant}", t))
            if len(self._shared) < 10_000:  # bounded: tenant names come from requests
                self._shared[tenant] = out
        if self.spec.per_user is not None and user_id:
            return [*out, (f"user:{tenant}/{user_id}", self.spec.per_user)]
        return out

    def check(self, tenant: str, user_id: str | None, now: float) -> OverBudget | None:
        for account, spec in self.accounts(tenant, user_id):
            verdict = check_one(account, spec, self._usage.get(account), now)
            if verdict is not None:
                return verdict
        return None

    def charge(self, tenant: str, user_id: str | None, tokens: int, usd: float, now: float) -> None:
        for account, spec in self.accounts(tenant, user_id):
            start = window_start(now, spec.period_s)
            u = self._usage.get(account)
            if u is None or u.window_start != start:
                if u is None and len(self._usage) >= self.max_accounts:
                    self._prune(now)
                u = self._usage[account] = Usage(start)
            u.tokens += tokens
            u.usd += usd

    def usage(self, account: str) -> Usage | None:
        return self._usage.get(account)

    def _prune(self, now: float) -> None:
        """Drop accounts whose window has ended (their usage no longer counts)."""
        longest = max([s.period_s for _, s in self._all_specs()] or [1])
        stale = [k for k, u in self._usage.items() if u.window_start + longest <= now]
        for k in stale:
            del self._usage[k]

    def _all_specs(self):
        if self.spec.global_ is not None:
            yield "global", self.spec.global_
        yield from self.spec.tenants.items()
        if self.spec.per_user is not None:
            yield "user", self.spec.per_user
