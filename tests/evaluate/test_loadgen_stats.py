"""The pure aggregates on hand-made records: percentiles, TPOT, goodput against SLOs, per kind."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from quantgate.evaluate.stats import RequestRecord, aggregate, meets_slo, percentile, summarize, tpot_of
from quantgate.workload import SLOSpec


def ok(id, kind, ttft, e2e, tokens, itl=()):
    return RequestRecord(id=id, kind=kind, ttft_s=ttft, e2e_s=e2e, tokens_out=tokens, itl_s=list(itl),
                         tpot_s=tpot_of(e2e, ttft, tokens))


def test_percentile_matches_numpy_linear_rule():
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101, 999):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 50, 95, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)
    assert percentile([], 50) is None
    assert percentile(list(range(1, 101)), 50) == 50.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_reports_milliseconds_and_counts():
    s = summarize([0.010, 0.020, 0.030])
    assert (s.n, s.requests) == (3, 3)
    assert s.p50 == pytest.approx(20.0) and s.mean == pytest.approx(20.0) and s.max == pytest.approx(30.0)
    assert s.p99 == pytest.approx(29.8)
    empty = summarize([])
    assert empty.n == 0 and empty.p50 is None


def test_tpot_excludes_the_first_token():
    assert tpot_of(e2e_s=0.140, ttft_s=0.050, tokens_out=10) == pytest.approx(0.010)
    assert tpot_of(0.05, 0.05, 1) is None and tpot_of(0.05, 0.05, 0) is None


def test_aggregate_rates_goodput_and_per_kind():
    recs = [
        ok("a", "short", 0.050, 0.140, 10, itl=[0.01] * 9),   # meets SLO
        ok("b", "short", 0.250, 0.340, 10, itl=[0.01] * 9),   # TTFT misses 200 ms
        ok("c", "long", 0.100, 1.100, 51, itl=[0.02] * 50),   # TPOT 20 ms misses 15 ms
        ok("d", "long", 0.100, 0.600, 51, itl=[0.01] * 50),   # meets SLO
        RequestRecord(id="e", kind="long", outcome="error", error="HTTP 500"),
        RequestRecord(id="f", kind="short", outcome="timeout", error="no complete response", ttft_s=0.05),
    ]
    slo = SLOSpec(ttft_ms=200, tpot_ms=15)
    a = aggregate(recs, wall_s=2.0, slo=slo)
    assert (a.total, a.ok, a.errors, a.timeouts) == (6, 4, 1, 1)
    assert a.error_rate == pytest.approx(1 / 6) and a.timeout_rate == pytest.approx(1 / 6)
    assert a.request_throughput == pytest.approx(2.0)  # 4 ok requests / 2 s
    assert a.output_token_throughput == pytest.approx((10 + 10 + 51 + 51) / 2.0)
    assert a.goodput == pytest.approx(1.0)  # a and d
    assert a.slo_attainment == pytest.approx(2 / 6)
    # the timed-out request's partial TTFT is not a latency sample
    assert a.ttft.n == 4 and a.ttft.p50 == pytest.approx(100.0)
    assert a.itl.n == 9 + 9 + 50 + 50 and a.itl.requests == 4
    assert a.tpot.max == pytest.approx(20.0)

    assert set(a.per_kind) == {"short", "long"}
    short, long = a.per_kind["short"], a.per_kind["long"]
    assert (short.total, short.ok, short.timeouts) == (3, 2, 1)
    assert (long.total, long.ok, long.errors) == (3, 2, 1)
    assert short.goodput + long.goodput == pytest.approx(a.goodput)
    assert long.e2e.p50 == pytest.approx(850.0)
    assert short.per_kind == {}

    # JSON-serialisable as is
    assert json.loads(json.dumps(a.to_dict()))["per_kind"]["long"]["ttft"]["n"] == 2


def test_no_slo_means_every_success_is_good():
    recs = [ok("a", "s", 0.5, 5.0, 3), RequestRecord(id="b", kind="s", outcome="error")]
    a = aggregate(recs, wall_s=1.0, slo=SLOSpec())
    assert a.goodput == pytest.approx(1.0) and a.slo_attainment == pytest.approx(0.5)


def test_slo_edges():
    one_token = ok("a", "s", 0.01, 0.01, 1)
    assert meets_slo(one_token, SLOSpec(tpot_ms=1))  # no decode phase, cannot miss TPOT
    assert meets_slo(ok("b", "s", 0.2, 0.3, 2), SLOSpec(ttft_ms=200, e2e_ms=300))  # targets are inclusive
    assert not meets_slo(ok("c", "s", 0.2, 0.3, 2), SLOSpec(e2e_ms=299))


def test_empty_run():
    a = aggregate([], wall_s=0.0)
    assert a.total == 0 and a.request_throughput == 0.0 and a.ttft.p50 is None and a.per_kind == {}
