"""Pure: the search for the highest load a pair sustains within the SLOs — a bisection over a
fixed geometric grid of request rates (or concurrencies), one probe at a time.

The grid is `low, low·growth, low·growth², …` up to `high` (concurrencies rounded up to distinct
integers). Attainment is assumed to fall as load rises, so a binary search over the grid's
indices, with a virtual pass below the first point and a virtual miss above the last, needs at
most ceil(log2(points + 1)) probes and ends with two neighbouring grid points: the highest that
met the SLOs and the one above it that did not. That pair is the answer's resolution, one
bisection step. Results that break the assumption follow the sweep's rule: a pass above a miss is
noise on a shared machine, not headroom, so the boundary is below the lowest miss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def grid(low: float, high: float, growth: float, integer: bool = False) -> list[float]:
    """The values a search may probe, increasing, `high` always the last (rates to three significant
    digits, so each is a value to pass to `quantgate loadtest --rate`)."""
    out: list[float] = []
    v, k = low, 0
    while v < high * (1 - 1e-9):
        x = float(math.ceil(v - 1e-9)) if integer else float(f"{v:.3g}")  # values people can type
        if not out or x > out[-1]:
            out.append(x)
        k += 1
        v = low * growth ** k
    top = float(math.ceil(high - 1e-9)) if integer else float(f"{high:.3g}")
    if not out or top > out[-1]:
        out.append(top)
    return out


def probes_needed(points: int) -> int:
    """The most probes a bisection over `points` grid values takes."""
    return math.ceil(math.log2(points + 1))


def bracket(values: list[float], results: list[tuple[float, bool]]) -> tuple[int, int]:
    """(index of the highest grid value known to pass, index of the lowest known to miss), with -1
    and len(values) standing for 'none yet'. A pass at or above the lowest miss is ignored."""
    idx = {v: i for i, v in enumerate(values)}
    misses = [idx[v] for v, ok in results if not ok and v in idx]
    hi = min(misses, default=len(values))
    lo = max((idx[v] for v, ok in results if ok and v in idx and idx[v] < hi), default=-1)
    return lo, hi


def next_probe(values: list[float], results: list[tuple[float, bool]], max_probes: int) -> float | None:
    """The grid value to probe next, or None when the search is over (the boundary is found to one
    grid step, or `max_probes` probes were made). Deterministic: the same results, the same probe."""
    if len(results) >= max_probes:
        return None
    lo, hi = bracket(values, results)
    if hi - lo <= 1:
        return None
    return values[(lo + hi) // 2]


@dataclass
class RateOutcome:
    axis: str                   # "rate" (requests/s) or "concurrency"
    status: str                 # found | all_pass (the top of the grid met them) | all_fail | unresolved
    max_value: float | None     # the highest probed value that met the SLOs (None: none did)
    next_value: float | None    # the grid value above it that missed (None: no miss, or none above)
    probes: int
    max_probes: int

    def to_dict(self) -> dict:
        return asdict(self)


def outcome(axis: str, values: list[float], results: list[tuple[float, bool]], max_probes: int) -> RateOutcome:
    """What the probes say. `unresolved`: the probe bound ran out with a gap of more than one grid
    step left (max_value is then a lower bound and next_value an upper bound, both measured)."""
    lo, hi = bracket(values, results)
    mx = values[lo] if lo >= 0 else None
    nxt = values[hi] if hi < len(values) else None
    if hi - lo > 1:
        status = "unresolved"
    elif hi == len(values):
        status = "all_pass"
    elif lo < 0:
        status = "all_fail"
    else:
        status = "found"
    return RateOutcome(axis=axis, status=status, max_value=mx, next_value=nxt, probes=len(results),
                       max_probes=max_probes)


def search(values: list[float], meets, max_probes: int, axis: str = "rate") -> tuple[RateOutcome, list]:
    """Run the bisection with `meets(value) -> bool` (a synthetic curve in tests; the I/O loop in
    measure.py drives next_probe itself, since each probe is an awaited load test)."""
    results: list[tuple[float, bool]] = []
    while (v := next_probe(values, results, max_probes)) is not None:
        results.append((v, bool(meets(v))))
    return outcome(axis, values, results, max_probes), results
