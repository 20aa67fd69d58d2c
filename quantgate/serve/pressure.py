"""Who puts the engine under pressure: each tenant's tokens over the ladder's window, and the few
that use far more than their share.

The degrade ladder moves on the engine's health; when it leaves normal, its light and moderate
rungs cut the requests of the tenants causing the pressure first (`culprits`), and everyone's only
when no tenant stands out (the load is spread evenly, so the cut is too). Pure: every call takes
`now` (seconds on the caller's clock); usage decays exponentially with the window as time constant,
so a tenant that stopped is forgiven within a few windows.
"""

from __future__ import annotations

import math
from collections import OrderedDict

# A tenant is a culprit when it used more than this many times its fair share (the window's tokens
# over the tenants that used any): 1.5 picks one tenant at 90 % of two, or at 30 % of ten, and none
# of ten tenants at 10 % each.
CULPRIT_FACTOR = 1.5
_FORGOTTEN = 1e-3  # decayed usage below this (tokens) counts as no usage at all


def culprits(usage: dict[str, float], factor: float = CULPRIT_FACTOR) -> frozenset[str]:
    """The tenants using more than `factor` × the fair share; a lone tenant is the whole pressure."""
    used = {t: u for t, u in usage.items() if u > _FORGOTTEN}
    if not used:
        return frozenset()
    if len(used) == 1:
        return frozenset(used)
    fair = sum(used.values()) / len(used)
    return frozenset(t for t, u in used.items() if u > factor * fair)


class TenantUsage:
    """Decayed token counts per tenant (least recently seen dropped past `max_tenants`, in O(1))."""

    def __init__(self, window_s: float, max_tenants: int = 10_000):
        self.window_s, self.max_tenants = window_s, max_tenants
        self._u: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant → (usage, when)

    def _decayed(self, value: float, then: float, now: float) -> float:
        return value * math.exp(-max(0.0, now - then) / self.window_s)

    def observe(self, tenant: str, tokens: float, now: float) -> None:
        v = self._u.pop(tenant, None)
        self._u[tenant] = ((self._decayed(*v, now) if v else 0.0) + tokens, now)
        if len(self._u) > self.max_tenants:
            self._u.popitem(last=False)

    def at(self, now: float) -> dict[str, float]:
        """Every tenant's usage decayed to `now` (the forgotten ones are dropped)."""
        out = {t: self._decayed(v, then, now) for t, (v, then) in self._u.items()}
        for t in [t for t, v in out.items() if v <= _FORGOTTEN]:
            del self._u[t], out[t]
        return out
