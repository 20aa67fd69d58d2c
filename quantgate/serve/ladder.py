"""The degrade ladder: normal → light → moderate → heavy → breaker, driven by live signals.

A pure state machine: the gateway feeds it one `Sample` per answered request to the active
deployment and calls `evaluate(now)` on a timer; it never reads a clock itself, so every
transition can be tested with made-up times.

The chapter's card, as rules:
- light     (P95 latency rising)          shorter context, fewer output tokens
- moderate  (cost / timeouts near limit)  fewer tokens still
- heavy     (errors / queueing rising)    rate limiting (smaller concurrency), essentials only
- breaker   (a key metric out of bounds)  switch to the fallback deployment; recover on its own

Going up is immediate (a level's trigger is any signal over its threshold). Going down is one
rung at a time, only after `hold_s` at the current rung and only when every signal is below
`hysteresis` × the current rung's thresholds, so the ladder does not flap around a threshold.
The breaker opens, waits `breaker_cooldown_s`, then lets one probe request at a time through to
the active deployment; `probe_successes` good probes close it (to heavy, stepping down from
there), one bad probe re-opens it.

The latency it judges is the engine's, not the client's: an answer longer than
`reference_tokens` counts as its time to first token plus that many tokens at its own pace
(`health_ms`), so a tenant asking for long answers does not read as a slow engine. The light and
moderate rungs cut the requests of the tenants that cause the pressure first (serve/pressure.py:
`actions_for`), and everyone's only when no tenant stands out; heavy and the breaker act for all.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from .manifest import LadderSpec, LevelSpec
from .pressure import TenantUsage, culprits


class Level(IntEnum):
    NORMAL = 0
    LIGHT = 1
    MODERATE = 2
    HEAVY = 3
    BREAKER = 4

    @property
    def label(self) -> str:
        return self.name.lower()


# What each rung tells the user (the card's last column).
NOTICES = {
    Level.NORMAL: None,
    Level.LIGHT: "answering with the conclusion and next steps first",
    Level.MODERATE: "using a faster, cheaper path to finish",
    Level.HEAVY: "busy right now: answers are shortened and some requests are turned away",
    Level.BREAKER: "switched to the stable fallback model",
}


@dataclass(frozen=True, slots=True)
class Sample:
    t: float            # seconds, on the caller's clock
    latency_ms: float
    ok: bool            # False for an error or a timeout
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Signals:
    n: int
    p95_ms: float
    error_rate: float
    cost_usd_per_min: float


@dataclass(frozen=True, slots=True)
class Transition:
    t: float
    frm: Level
    to: Level
    reason: str


def health_ms(total_ms: float, generation_ms: float, tokens_out: int, reference_tokens: int) -> float:
    """An answered attempt's latency as the ladder judges it: what an answer of at most
    `reference_tokens` took. A longer answer keeps its time to first token (`total_ms` less its
    generation) and its generation scaled to the reference length, so the length a client asked
    for does not count, while a slow prefill or a slow pace does. A provider that does not split
    its timing (generation_ms 0: the answer came whole) is scaled as a whole."""
    if tokens_out <= reference_tokens:
        return total_ms
    scale = reference_tokens / tokens_out
    if generation_ms <= 0:
        return total_ms * scale
    return total_ms - generation_ms + generation_ms * scale


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values.

    Deliberately not evaluate.stats.percentile (linear interpolation, numpy's default, used for
    every reported measurement): the ladder compares a live window's P95 with a threshold to
    decide a step down, and nearest rank returns a latency some request actually had — a window
    of 20 fast requests and one slow one reads its real P95, not a value interpolated toward the
    outlier — and serve/ imports nothing from evaluate/."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def compute_signals(samples: "deque[Sample] | list[Sample]", now: float, window_s: float) -> Signals:
    recent = [s for s in samples if s.t > now - window_s]
    if not recent:
        return Signals(0, 0.0, 0.0, 0.0)
    errors = sum(1 for s in recent if not s.ok)
    cost = sum(s.cost_usd for s in recent)
    return Signals(
        n=len(recent),
        p95_ms=percentile([s.latency_ms for s in recent], 95),
        error_rate=errors / len(recent),
        cost_usd_per_min=cost * 60.0 / window_s,
    )


def over(sig: Signals, lv: LevelSpec, scale: float = 1.0) -> list[str]:
    """Which of this rung's thresholds (× scale) the signals reach; empty = none."""
    hits = []
    if lv.p95_ms is not None and sig.p95_ms >= lv.p95_ms * scale:
        hits.append(f"p95 {sig.p95_ms:.0f} ms ≥ {lv.p95_ms * scale:.0f}")
    if lv.error_rate is not None and sig.error_rate >= lv.error_rate * scale:
        hits.append(f"error rate {sig.error_rate:.2f} ≥ {lv.error_rate * scale:.2f}")
    if lv.cost_usd_per_min is not None and sig.cost_usd_per_min >= lv.cost_usd_per_min * scale:
        hits.append(f"cost {sig.cost_usd_per_min:.4f} $/min ≥ {lv.cost_usd_per_min * scale:.4f}")
    return hits


def level_spec(spec: LadderSpec, level: Level) -> LevelSpec | None:
    return (None, spec.light, spec.moderate, spec.heavy, spec.breaker)[level]


def target_level(sig: Signals, spec: LadderSpec) -> tuple[Level, str]:
    """The highest rung whose trigger fires, with why; NORMAL while the window is too thin."""
    if sig.n < spec.min_samples:
        return Level.NORMAL, f"{sig.n} samples < min_samples {spec.min_samples}"
    for level in (Level.BREAKER, Level.HEAVY, Level.MODERATE, Level.LIGHT):
        hits = over(sig, level_spec(spec, level))
        if hits:
            return level, "; ".join(hits)
    return Level.NORMAL, "all signals under the light thresholds"


CLIENT_KINDS = frozenset({"rejected", "invalid", "client_closed"})


def upstream_fault(kind: str, window_ms: float, expected_ms: float) -> bool:
    """Whether a failed attempt is evidence against the upstream (and so may move the ladder).

    Only the upstream's own failures count. A request the upstream refused (4xx), input the
    provider cannot take, or a client that left say nothing about the upstream. A timeout counts
    only when the attempt had at least `expected_ms` (what the deployment normally needs, with
    slack): a client that asks for budget_ms=100 from a model that needs 400 ms is turned away
    without telling every other tenant the model is failing.
    """
    if kind in CLIENT_KINDS:
        return False
    if kind == "timeout":
        return window_ms >= expected_ms
    return True


class Ladder:
    """The state machine. Not thread-safe: the gateway calls it from its event loop only."""

    def __init__(self, spec: LadderSpec, now: float = 0.0, max_samples: int = 10_000):
        self.spec = spec
        self.level = Level.NORMAL
        self.since = now
        self.samples: deque[Sample] = deque(maxlen=max_samples)
        self.half_open = False
        self.probe_in_flight = False
        self.probe_ok = 0
        self.last_signals = Signals(0, 0.0, 0.0, 0.0)
        self.usage = TenantUsage(spec.window_s)
        self.culprits: frozenset[str] = frozenset()  # the tenants causing the pressure (at the last evaluate)

    # ---------------------------------------------------------------- inputs
    def observe(self, sample: Sample) -> None:
        self.samples.append(sample)

    def observe_usage(self, tenant: str, tokens: int, now: float) -> None:
        """What one finished request cost the engine (its prompt and output tokens), by tenant."""
        if tokens > 0:
            self.usage.observe(tenant, tokens, now)

    def evaluate(self, now: float) -> list[Transition]:
        """Recompute signals and move the ladder; returns the transitions made (for logs/metrics)."""
        if not self.spec.enabled:
            return []
        self.usage.window_s = self.spec.window_s
        self.culprits = culprits(self.usage.at(now))
        while self.samples and self.samples[0].t <= now - self.spec.window_s:
            self.samples.popleft()
        sig = compute_signals(self.samples, now, self.spec.window_s)
        self.last_signals = sig
        if self.level == Level.BREAKER:
            if not self.half_open and now - self.since >= self.spec.breaker_cooldown_s:
                self.half_open = True
                self.probe_ok = 0
                return [Transition(now, Level.BREAKER, Level.BREAKER, "cool-down over: half-open, probing active")]
            return []
        target, why = target_level(sig, self.spec)
        if target > self.level:
            return [self._move(now, target, why)]
        if target < self.level and now - self.since >= self.spec.hold_s:
            still = over(sig, level_spec(self.spec, self.level), self.spec.hysteresis) if sig.n else []
            if not still:
                return [self._move(now, Level(self.level - 1), f"calm below hysteresis ({why})")]
        return []

    # ------------------------------------------------------------- routing
    def route(self) -> str:
        """'active' or 'fallback' for the next request; a half-open breaker lets one probe through."""
        if self.level != Level.BREAKER:
            return "active"
        if self.half_open and not self.probe_in_flight:
            self.probe_in_flight = True
            return "probe"
        return "fallback"

    def probe_done(self, ok: bool, now: float) -> list[Transition]:
        """Outcome of a 'probe' request (always call it, also on cancellation: ok=False)."""
        self.probe_in_flight = False
        if self.level != Level.BREAKER or not self.half_open:
            return []
        if not ok:
            self.half_open = False
            self.since = now
            return [Transition(now, Level.BREAKER, Level.BREAKER, "probe failed: breaker re-opened")]
        self.probe_ok += 1
        if self.probe_ok >= self.spec.probe_successes:
            self.samples.clear()  # old failures must not re-trip the breaker at once
            return [self._move(now, Level.HEAVY, f"{self.probe_ok} probes succeeded: breaker closed")]
        return []

    def trip(self, now: float, why: str) -> list[Transition]:
        """Open the breaker on another replica's word (shared state); nothing if it is open already."""
        if not self.spec.enabled or self.level == Level.BREAKER:
            return []
        return [self._move(now, Level.BREAKER, why)]

    def probe_abandoned(self) -> None:
        """A 'probe' request that never reached the active deployment: free the slot, judge nothing."""
        self.probe_in_flight = False

    def actions(self) -> LevelSpec | None:
        """What the current rung does to a request (None at normal)."""
        return level_spec(self.spec, self.level) if self.level not in (Level.NORMAL, Level.BREAKER) else None

    def actions_for(self, tenant: str) -> LevelSpec | None:
        """What the current rung does to this tenant's request: at light and moderate only the
        tenants causing the pressure are cut while any stands out; heavy cuts everyone."""
        rung = self.actions()
        if rung is None or self.level >= Level.HEAVY or not self.culprits or tenant in self.culprits:
            return rung
        return None

    def _move(self, now: float, to: Level, why: str) -> Transition:
        t = Transition(now, self.level, to, why)
        self.level, self.since = to, now
        self.half_open = False
        self.probe_in_flight = False
        return t
