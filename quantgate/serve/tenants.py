"""Budgets per tenant, per user and global: tokens and/or USD per period, with a reset time.

Periods are fixed windows aligned to multiples of `period_s` on the wall clock (a daily budget
resets at 00:00 UTC), so the reset time a client is told is exact and the same on every replica.
A request is refused when an account it draws on is already spent, counting what requests in
flight have reserved: at admission a request reserves an estimate (its prompt and max_tokens) on
every account it draws on, and when it ends the reservation is replaced by what it really cost.
So N concurrent requests cannot overshoot a budget by N answers: at most the last admitted one
overshoots, by its own size.

Accounts live in two bounded least-recently-used maps (users; tenants and global), so a client
inventing user ids costs O(1) per new account and cannot push out the tenant accounts.

Pure: every method takes `now` (epoch seconds).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone

from .manifest import BudgetsSpec, BudgetSpec

DEFAULT_TENANT = "default"


@dataclass(slots=True)
class Usage:
    window_start: float
    tokens: int = 0
    usd: float = 0.0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds on its accounts until it is settled."""

    accounts: list[tuple[str, BudgetSpec]]
    tokens: int
    usd: float
    settled: bool = False


@dataclass(frozen=True, slots=True)
class OverBudget:
    account: str          # 'global', 'tenant:acme' or 'user:acme/u1'
    used: str             # e.g. '10234/10000 tokens'
    reset_at: float       # epoch seconds

    def message(self, now: float) -> str:
        when = datetime.fromtimestamp(self.reset_at, timezone.utc).isoformat().replace("+00:00", "Z")
        resets = f"resets at {when} (in {max(0, math.ceil(self.reset_at - now))} s)"
        if self.account == "global":  # every tenant's spend together is the operator's, not a tenant's, to know
            return f"this gateway's shared budget is spent for this period; {resets}"
        return f"{self.account} is over budget ({self.used} this period); {resets}"

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
    if spec.tokens is not None and usage.tokens + usage.reserved_tokens >= spec.tokens:
        return OverBudget(account, f"{usage.tokens}/{spec.tokens} tokens"
                          + (f", {usage.reserved_tokens} reserved" if usage.reserved_tokens else ""), reset)
    if spec.usd is not None and usage.usd + usage.reserved_usd >= spec.usd:
        return OverBudget(account, f"${usage.usd:.6f}/${spec.usd:.6f}"
                          + (f", ${usage.reserved_usd:.6f} reserved" if usage.reserved_usd else ""), reset)
    return None


class Ledger:
    """Usage per account for the current window; survives manifest reloads (same object)."""

    def __init__(self, spec: BudgetsSpec, max_accounts: int = 100_000):
        self.spec = spec
        self.max_accounts = max_accounts
        self._users: OrderedDict[str, Usage] = OrderedDict()
        self._shared_usage: OrderedDict[str, Usage] = OrderedDict()  # tenant and global accounts
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

    def _map(self, account: str) -> OrderedDict[str, Usage]:
        return self._users if account.startswith("user:") else self._shared_usage

    def _current(self, account: str, spec: BudgetSpec, now: float) -> Usage:
        """The account's usage in the current window, created (evicting the least recent) if new."""
        d = self._map(account)
        start = window_start(now, spec.period_s)
        u = d.get(account)
        if u is None:
            u = d[account] = Usage(start)
            if len(d) > self.max_accounts:
                d.popitem(last=False)
        else:
            d.move_to_end(account)
            if u.window_start != start:  # a new period: what was spent before no longer counts
                u.window_start, u.tokens, u.usd = start, 0, 0.0
        return u

    def check(self, tenant: str, user_id: str | None, now: float) -> OverBudget | None:
        for account, spec in self.accounts(tenant, user_id):
            verdict = check_one(account, spec, self.usage(account), now)
            if verdict is not None:
                return verdict
        return None

    def reserve(self, tenant: str, user_id: str | None, tokens: int, usd: float,
                now: float) -> OverBudget | Reservation:
        """Refuse (OverBudget) or hold `tokens`/`usd` on every account until `settle`."""
        over = self.check(tenant, user_id, now)
        if over is not None:
            return over
        accounts = self.accounts(tenant, user_id)
        for account, spec in accounts:
            u = self._current(account, spec, now)
            u.reserved_tokens += tokens
            u.reserved_usd += usd
        return Reservation(accounts, tokens, usd)

    def settle(self, r: Reservation, tokens: int, usd: float, now: float) -> None:
        """Replace the reservation by what the request really cost (once; later calls do nothing)."""
        if r.settled:
            return
        r.settled = True
        for account, spec in r.accounts:
            u = self._current(account, spec, now)
            u.reserved_tokens = max(0, u.reserved_tokens - r.tokens)
            u.reserved_usd = max(0.0, u.reserved_usd - r.usd)
            u.tokens += tokens
            u.usd += usd

    def charge(self, tenant: str, user_id: str | None, tokens: int, usd: float, now: float) -> None:
        for account, spec in self.accounts(tenant, user_id):
            u = self._current(account, spec, now)
            u.tokens += tokens
            u.usd += usd

    def usage(self, account: str) -> Usage | None:
        return self._map(account).get(account)

    def __len__(self) -> int:
        return len(self._users) + len(self._shared_usage)
