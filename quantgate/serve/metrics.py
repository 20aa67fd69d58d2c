"""Prometheus metrics for the gateway, labelled by deployment and model version.

Each gateway owns its own CollectorRegistry (not prometheus-client's global one), so several
gateways in one process — tests, benchmarks — never mix their counts.

The series touched by every request (requests and their latency, upstream latency, cache hits
and misses, tokens, cost, upstream errors, degrade paths) are plain numbers in `_DepSeries`,
turned into Prometheus families only when /metrics is scraped: prometheus-client's own counters
take a lock and a label lookup per update, which was the largest share of the gateway's own
per-request cost. Everything runs on the event loop's thread, so plain numbers are safe. The
rare events (429s, reloads, ladder transitions) use prometheus-client's classes directly.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_LE = [str(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
DEP = ("deployment", "model_version")


class _Count:
    __slots__ = ("v",)

    def __init__(self):
        self.v = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.v += n


class _Hist:
    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bucket with le ≥ value
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for le, c in zip(_LE, self.counts):
            total += c
            out.append((le, total))
        return out


class _DepSeries:
    """One deployment's hot series (the deployment '-' holds requests refused before routing)."""

    def __init__(self, name: str, version: str):
        self.labels = [name, version]
        self.cache_hit, self.cache_miss = _Count(), _Count()
        self.tokens_in, self.tokens_out, self.cost = _Count(), _Count(), _Count()
        self.requests: dict[tuple[str, str], _Hist] = {}
        self.upstreams: dict[str, _Hist] = {}
        self.errors: dict[str, _Count] = {}
        self.degrades: dict[str, _Count] = {}

    def request(self, route: str, outcome: str, seconds: float) -> None:
        h = self.requests.get((route, outcome))
        if h is None:
            h = self.requests[(route, outcome)] = _Hist()
        h.observe(seconds)

    def upstream(self, outcome: str, seconds: float) -> None:
        h = self.upstreams.get(outcome)
        if h is None:
            h = self.upstreams[outcome] = _Hist()
        h.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.setdefault(kind, _Count()).inc()

    def degraded(self, path: str) -> None:
        self.degrades.setdefault(path, _Count()).inc()


class _HotCollector:
    """Turns every deployment's plain numbers into Prometheus families at scrape time."""

    def __init__(self, series: dict[str, _DepSeries]):
        self.series = series

    def collect(self):
        req = CounterMetricFamily("quantgate_requests", "Requests answered, by route and outcome",
                                  labels=("route", "outcome", *DEP))
        lat = HistogramMetricFamily("quantgate_request_latency_seconds", "End-to-end latency at the gateway",
                                    labels=("route", "outcome", *DEP))
        up = HistogramMetricFamily("quantgate_upstream_latency_seconds", "Provider call latency",
                                   labels=("outcome", *DEP))
        hits = CounterMetricFamily("quantgate_cache_hits", "Answers served from the cache", labels=DEP)
        misses = CounterMetricFamily("quantgate_cache_misses", "Cache lookups that missed", labels=DEP)
        tokens = CounterMetricFamily("quantgate_tokens", "Tokens in and out", labels=("direction", *DEP))
        cost = CounterMetricFamily("quantgate_cost_usd", "Cost at the manifest's prices", labels=DEP)
        errors = CounterMetricFamily("quantgate_upstream_errors", "Provider failures, by kind",
                                     labels=("kind", *DEP))
        degraded = CounterMetricFamily("quantgate_degraded", "Answers that took a degrade path, by path",
                                       labels=("path", *DEP))
        for s in list(self.series.values()):
            lab = s.labels
            for (route, outcome), h in s.requests.items():
                n = sum(h.counts)
                req.add_metric([route, outcome, *lab], n)
                lat.add_metric([route, outcome, *lab], h.buckets(), h.sum)
            for outcome, h in s.upstreams.items():
                up.add_metric([outcome, *lab], h.buckets(), h.sum)
            if lab[0] == "-":
                continue  # refused before routing: no cache, tokens or cost
            hits.add_metric(lab, s.cache_hit.v)
            misses.add_metric(lab, s.cache_miss.v)
            tokens.add_metric(["in", *lab], s.tokens_in.v)
            tokens.add_metric(["out", *lab], s.tokens_out.v)
            cost.add_metric(lab, s.cost.v)
            for kind, c in s.errors.items():
                errors.add_metric([kind, *lab], c.v)
            for path, c in s.degrades.items():
                degraded.add_metric([path, *lab], c.v)
        yield from (req, lat, up, hits, misses, tokens, cost, errors, degraded)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self._dep: dict[str, _DepSeries] = {}
        r.register(_HotCollector(self._dep))
        self.in_flight = Gauge("quantgate_in_flight", "Requests holding a concurrency slot", registry=r)
        self.queued = Gauge("quantgate_queued", "Requests waiting for a slot", registry=r)
        self.rejected = Counter("quantgate_rejected", "Requests refused before any upstream work, by reason",
                                ("reason",), registry=r)
        self.throttled = Counter("quantgate_429", "429 answers (concurrency, tenant or global budget)",
                                 ("reason",), registry=r)
        self.budget_exhausted = Counter("quantgate_budget_exhausted", "Requests whose budget_ms ran out",
                                        ("route",), registry=r)
        self.degrade_level = Gauge("quantgate_degrade_level", "Ladder rung: 0 normal … 4 breaker", registry=r)
        self.transitions = Counter("quantgate_degrade_transitions", "Ladder transitions",
                                   ("from_level", "to_level"), registry=r)
        self.trace_dropped = Counter("quantgate_trace_dropped", "Trace records dropped (buffer full or the "
                                     "file could not be written)", registry=r)
        self.reloads = Counter("quantgate_manifest_reloads", "Manifest reloads, by result", ("result",), registry=r)
        self.state_up = Gauge("quantgate_shared_state_up", "1 while the replicas' shared state (Redis) answers, "
                              "0 while this replica serves with local limits; absent without shared state",
                              ("backend",), registry=r)
        self.state_local = Counter("quantgate_shared_state_local", "Requests decided with local limits (or "
                                   "refused, on_redis_down=closed) because Redis did not answer", ("mode",),
                                   registry=r)
        self.redis_round_trips = Counter("quantgate_redis_round_trips", "Round trips to the shared state's "
                                         "Redis, by what they were for (a batch of background writes is one)",
                                         ("op",), registry=r)
        self.engine_up = Gauge("quantgate_engine_up", "1 while a started engine answers (health and probe), 0 "
                               "while it starts, restarts or has failed", DEP, registry=r)
        self.engine_restarts = Counter("quantgate_engine_restarts", "Restarts of a started engine after it "
                                       "exited or failed to start", DEP, registry=r)
        self.engine_switch_failed = Counter("quantgate_engine_switch_failed", "Blue/green switches abandoned: "
                                            "the new plan's engine was refused, failed to start or never got "
                                            "ready (the old plan kept serving)", registry=r)
        self.active = Gauge("quantgate_active_deployment", "1 for the deployment the manifest makes active",
                            DEP, registry=r)
        self.canary_weight = Gauge("quantgate_canary_weight", "Percent of traffic a running canary's challenger "
                                   "takes (0 once it ends)", DEP, registry=r)
        self.canary_attempts = Counter("quantgate_canary_attempts", "Attempts on each arm's deployment while a "
                                       "canary runs, by arm (stable, canary) and outcome", ("arm", "outcome"),
                                       registry=r)
        self.canary_probes = Counter("quantgate_canary_probes", "Regression-set probes graded, by arm and result",
                                     ("arm", "result"), registry=r)
        self.canary_decisions = Counter("quantgate_canary_decisions", "Canary decisions written to the manifest",
                                        ("action",), registry=r)

    def for_deployment(self, d) -> _DepSeries:
        s = self._dep.get(d.key)
        if s is None:
            s = self._dep[d.key] = _DepSeries(d.name, d.model_version)
        return s

    def unrouted(self) -> _DepSeries:
        """The series for requests refused before any deployment was chosen (bad input, 429s)."""
        s = self._dep.get("-")
        if s is None:
            s = self._dep["-"] = _DepSeries("-", "-")
        return s

    def set_active(self, d, previous=None) -> None:
        if previous is not None:
            self.active.labels(previous.name, previous.model_version).set(0)
        self.active.labels(d.name, d.model_version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
