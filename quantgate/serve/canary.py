"""The canary's decisions, pure: which arm a caller is on, and what one step's windows say to do.

`arm_of` puts a tenant+user on the canary when a hash of (challenger, tenant, user) falls below the
step's weight: sticky inside a step, and since weights only grow, a user on the canary stays there
when it steps up. `decide` reads the two windows (stable and canary: requests, errors, timeouts,
TTFT and E2E latencies, probe verdicts) with the time `now` handed in, and says hold, step, promote
or rollback with the figures that decided it. A rate gate may roll back early, before the step's
`min_requests`, only when the excess is significant (one-sided z ≥ 3 against the threshold, over at least
`min_fail_requests` samples); a latency gate early only when the canary's median is already past the stable P95's
bound. Stepping up needs every gate passing on enough samples, enough time, and a probe round.

`start`, `record`, `advance` and `abort` are the manifest edits (the stable deployment stays
`active` until the last step passes; the block stays as the record of how the canary ended). The
I/O — the windows, the probes, the lock and the atomic write — is serve/canary_run.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import QuantgateError
from .ladder import percentile
from .manifest import CanaryEvent, CanarySpec, Deployment, HistoryEvent, Manifest
from .promote import _validated, promote

Z_SIGNIFICANT = 3.0
MAX_SAMPLES = 20_000  # latencies kept per window (a long step keeps its first ones: enough for a P95)


def arm_of(canary: CanarySpec | None, tenant: str, user: str | None) -> str:
    """'canary' or 'stable' for this caller now (pure, sticky per challenger, tenant and user)."""
    if canary is None or not canary.running:
        return "stable"
    h = hashlib.blake2b(f"{canary.challenger.key}\0{tenant}\0{user or ''}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(h, "little") % 10_000 / 100  # 0.00 … 99.99
    return "canary" if bucket < canary.weight else "stable"


@dataclass
class Window:
    """One deployment's figures over a step: its attempts' outcomes, latencies, probe verdicts."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    probes_passed: int = 0
    probes_total: int = 0

    def ok(self, ttft_ms: float, e2e_ms: float) -> None:
        self.requests += 1
        if len(self.e2e_ms) < MAX_SAMPLES:
            self.ttft_ms.append(ttft_ms)
            self.e2e_ms.append(e2e_ms)

    def failed(self, kind: str) -> None:
        self.requests += 1
        if kind == "timeout":
            self.timeouts += 1
        else:
            self.errors += 1

    def probed(self, passed: bool) -> None:
        self.probes_total += 1
        self.probes_passed += passed

    def figures(self) -> dict[str, Any]:
        n = self.requests
        return {"requests": n, "error_rate": round(self.errors / n, 4) if n else None,
                "budget_exhausted_rate": round(self.timeouts / n, 4) if n else None,
                "p50_e2e_ms": _ms(percentile(self.e2e_ms, 50)) if self.e2e_ms else None,
                "p95_ttft_ms": _ms(percentile(self.ttft_ms, 95)) if self.ttft_ms else None,
                "p95_e2e_ms": _ms(percentile(self.e2e_ms, 95)) if self.e2e_ms else None,
                "probes": f"{self.probes_passed}/{self.probes_total}",
                "probe_pass_rate": round(self.probes_passed / self.probes_total, 4) if self.probes_total else None}


def _ms(v: float) -> float:
    return round(v, 3)


@dataclass(frozen=True)
class Decision:
    action: str            # hold | step | promote | rollback
    reason: str
    figures: dict[str, Any]


def _rate_excess(name: str, cx: int, cn: int, sx: int, sn: int, thr: float, c: CanarySpec) -> str | None:
    """Why the canary's rate of `name` is too high against the stable's, or None (not, or not yet significant)."""
    if cn < c.min_fail_requests:
        return None
    pc, ps = cx / cn, (sx / sn if sn else 0.0)
    if pc - ps <= thr:
        return None
    why = f"{name} {pc:.3f} vs stable {ps:.3f} (+{pc - ps:.3f} > {thr})"
    if cn >= c.min_requests:
        return why
    # one-sided test of "canary − stable ≤ thr", its variance taken at that boundary (not pooled: a
    # pooled rate near 0 would call one error in 20 significant)
    p0 = min(1.0, max(ps + thr, 0.5 / cn))
    se = math.sqrt(p0 * (1 - p0) / cn + (ps * (1 - ps) / sn if sn else 0.0)) or 1e-9
    z = (pc - ps - thr) / se
    return f"{why}, z={z:.1f} after {cn} requests" if z >= Z_SIGNIFICANT else None


def _slower(name: str, mine: list[float], theirs: list[float], ratio: float, slack: float,
            c: CanarySpec) -> str | None:
    """Why the canary's P95 `name` is past stable P95 × ratio + slack; early (before min_requests) only
    when even its median is past that bound."""
    if len(mine) < c.min_fail_requests or len(theirs) < c.min_fail_requests:
        return None
    bound = percentile(theirs, 95) * ratio + slack
    p95, p50 = percentile(mine, 95), percentile(mine, 50)
    if len(mine) >= c.min_requests and p95 > bound:
        return f"P95 {name} {p95:.1f} ms > stable's {percentile(theirs, 95):.1f} × {ratio} + {slack} ms"
    if p50 > bound:
        return (f"median {name} {p50:.1f} ms is past stable's P95 {percentile(theirs, 95):.1f} × {ratio} + "
                f"{slack} ms after {len(mine)} requests")
    return None


def failing(c: CanarySpec, stable: Window, canary: Window) -> list[str]:
    """The live gates the canary fails, significantly (pure)."""
    g = c.gates
    out = [
        _rate_excess("error rate", canary.errors, canary.requests, stable.errors, stable.requests, g.error_rate, c),
        _rate_excess("budget-exhausted rate", canary.timeouts, canary.requests, stable.timeouts, stable.requests,
                     g.budget_exhausted_rate, c),
        _slower("TTFT", canary.ttft_ms, stable.ttft_ms, g.p95_ttft_ratio, g.latency_slack_ms, c),
        _slower("E2E", canary.e2e_ms, stable.e2e_ms, g.p95_e2e_ratio, g.latency_slack_ms, c),
    ]
    n = len(c.probes.cases)
    if n and canary.probes_total >= n and stable.probes_total >= n:
        pc, ps = canary.probes_passed / canary.probes_total, stable.probes_passed / stable.probes_total
        if ps - pc > g.probe_pass_rate:
            out.append(f"probe pass rate {pc:.3f} ({canary.probes_passed}/{canary.probes_total}) vs stable "
                       f"{ps:.3f} (−{ps - pc:.3f} > {g.probe_pass_rate})")
    return [w for w in out if w]


def decide(c: CanarySpec, stable: Window, canary: Window, *, now: datetime,
           engine_problem: str | None = None) -> Decision:
    """hold / step / promote / rollback for the running canary `c` from this step's windows (pure)."""
    elapsed = (now - c.step_started).total_seconds()
    figures = {"step": c.step, "weight": c.weight, "elapsed_s": round(elapsed, 3),
               "stable": stable.figures(), "canary": canary.figures()}
    if engine_problem:
        return Decision("rollback", f"challenger engine: {engine_problem}", figures)
    bad = failing(c, stable, canary)
    if bad:
        return Decision("rollback", "; ".join(bad), figures)
    short = []
    if canary.requests < c.min_requests:
        short.append(f"{canary.requests}/{c.min_requests} canary requests")
    if elapsed < c.min_seconds:
        short.append(f"{elapsed:.0f}/{c.min_seconds:.0f} s at this step")
    n = len(c.probes.cases)
    if n and canary.probes_total < n:
        short.append(f"{canary.probes_total}/{n} probes graded")
    if c.weight < 100 and stable.requests < c.min_fail_requests:
        short.append(f"{stable.requests}/{c.min_fail_requests} stable requests to compare with")
    if short:
        return Decision("hold", "waiting for " + ", ".join(short), figures)
    last = c.step == len(c.steps) - 1
    return Decision("promote" if last else "step", f"every live gate passes at {c.weight:g}%", figures)


# ------------------------------------------------------------------------------ manifest edits
def start(m: Manifest, challenger: Deployment, steps: list[float], *, now: datetime, by: str, reason: str = "",
          **settings) -> Manifest:
    """`promote --canary`: the challenger beside the active deployment at the first step."""
    if m.canary is not None and m.canary.running:
        raise QuantgateError(f"a canary of '{m.canary.challenger.key}' is already running at "
                             f"{m.canary.weight:g}%: `quantgate canary abort` it first")
    if challenger.key == m.active.key:
        raise QuantgateError(f"'{challenger.key}' is already the active deployment")
    spec = CanarySpec(challenger=challenger, steps=steps, step_started=now, **settings)
    ev = CanaryEvent(what="start", when=now, step=0, weight=spec.weight, why=reason, by=by)
    spec = spec.model_copy(update={"history": [ev]})
    hist = HistoryEvent(what="canary start", when=now, why=reason or f"steps {steps}", by=by,
                        deployment=f"{m.active.key} + {challenger.key} at {spec.weight:g}%")
    return _validated(m.model_copy(update={"canary": spec, "history": [*m.history, hist]}))


def record(m: Manifest, d: Decision, *, now: datetime, by: str, step: int) -> Manifest | None:
    """Write decision `d`, taken at `step`, into `m`; None when there is nothing to write (a hold) or the
    manifest moved on meanwhile (another replica or a person decided first: theirs stands)."""
    c = m.canary
    if d.action == "hold" or c is None or not c.running or c.step != step:
        return None
    if d.action == "step":
        return _moved(m, c, "step", step + 1, d.reason, by, now, d.figures)
    if d.action == "promote":
        return _promoted(m, c, d.reason, by, now, d.figures)
    return _rolled_back(m, c, d.reason, by, now, d.figures)


def advance(m: Manifest, *, now: datetime, by: str, reason: str) -> Manifest:
    """`quantgate canary advance`: a person steps up (or, at the last step, promotes) by hand."""
    c = _running(m)
    why = f"advanced by hand: {reason or 'no reason given'}"
    if c.step == len(c.steps) - 1:
        return _promoted(m, c, why, by, now, None)
    return _moved(m, c, "step", c.step + 1, why, by, now, None)


def abort(m: Manifest, *, now: datetime, by: str, reason: str) -> Manifest:
    """`quantgate canary abort`: weight 0, the stable deployment keeps serving."""
    return _rolled_back(m, _running(m), f"aborted by hand: {reason or 'no reason given'}", by, now, None)


def _running(m: Manifest) -> CanarySpec:
    if m.canary is None or not m.canary.running:
        raise QuantgateError("no canary is running in this manifest (`quantgate promote RUN -c X --canary 5,25,50,100` "
                             "starts one)")
    return m.canary


def _edit(m: Manifest, c: CanarySpec, what: str, why: str, by: str, now: datetime, figures, *, headline: str,
          deployment: str, **update) -> Manifest:
    """The canary block changed by `update`, with an event in its history and one in the manifest's."""
    ev = CanaryEvent(what=what, when=now, step=update.get("step", c.step), weight=update.pop("weight"), why=why,
                     by=by, figures=figures)
    new = c.model_copy(update={**update, "history": [*c.history, ev]})
    hist = HistoryEvent(what=headline, when=now, why=why, by=by, figures=figures, deployment=deployment)
    return _validated(m.model_copy(update={"canary": new, "history": [*m.history, hist]}))


def _moved(m, c, what, step, why, by, now, figures) -> Manifest:
    return _edit(m, c, what, why, by, now, figures, headline="canary step", step=step, step_started=now,
                 weight=c.steps[step], deployment=f"{c.challenger.key} {c.weight:g}% → {c.steps[step]:g}%")


def _rolled_back(m, c, why, by, now, figures) -> Manifest:
    return _edit(m, c, "rollback", why, by, now, figures, headline="canary rollback", state="rolled_back", weight=0,
                 deployment=f"{c.challenger.key} at {c.weight:g}% → 0%; {m.active.key} stays active")


def _promoted(m, c, why, by, now, figures) -> Manifest:
    done = _edit(m, c, "promote", why, by, now, figures, headline="canary promote", state="promoted", weight=100,
                 deployment=f"{c.challenger.key} at {c.weight:g}% → active")
    return promote(done, c.challenger, now=now, by=by, reason=f"canary passed every step: {why}")
