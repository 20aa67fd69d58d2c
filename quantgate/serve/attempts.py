"""One request's attempts against its plan: the part that plain and streamed answers share.

`Gateway` admits a request (the guards, serve/guards) and then hands it to an `Attempts`: plan the attempts
(active, degraded, fallback) from the ladder and the budget left, give each the time it may take,
record a failure (only the upstream's own faults reach the ladder), settle a success (budget,
estimator, metrics, cache) or turn the last failure into the client's error. `answer()` is the
plain path; `streaming.stream_answer()` is the streamed one, built on the same public steps.

An `Attempts` captures the gateway's collaborators when the request starts, so a manifest reload
mid-request neither mixes two ladders nor feeds one model's timings into another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from .budget import Estimator, Plan, plan_request, trim_context
from .charges import charged
from .ladder import Ladder, Sample, health_ms, upstream_fault
from .manifest import Deployment
from .metrics import GatewayMetrics
from .providers import GenRequest, GenResult, ProviderError
from .providers.base import generate_within
from .records import Answer, ChatCall, GatewayError, RequestState
from .runtime import Runtime

log = logging.getLogger("quantgate.serve")
perf = time.perf_counter

# A timeout on an attempt given less than this says nothing about the upstream, however fast it
# usually is (a fast upstream's estimate times two could otherwise be a few milliseconds).
MIN_TIMEOUT_EVIDENCE_MS = 100.0


@dataclass
class Attempts:
    """The attempts of one admitted request (`rt`, `call`, `ctx`) with the gateway's collaborators."""

    rt: Runtime
    call: ChatCall
    ctx: RequestState
    metrics: GatewayMetrics
    estimator: Estimator
    ladder: Ladder
    cache: object | None
    clock: Callable[[], float]
    wall: Callable[[], float]
    apply: Callable[[list], None]  # the gateway's reaction to ladder transitions (metrics, limits)

    # ------------------------------------------------------------------ the steps
    def plan(self) -> str:
        """Plan the attempts; returns why a request with no attempt left would be refused."""
        rt, ctx, s = self.rt, self.ctx, self.rt.serving
        ctx.route = self.ladder.route()
        # a deployment whose engine is starting or restarting is skipped, not tried: no budget spent on it
        has_fallback = rt.fallback is not None and rt.available("fallback")
        skipped = None
        if not rt.available("active"):
            if ctx.route == "probe":
                self.ladder.probe_abandoned()
            if not has_fallback:
                ctx.route, ctx.unready = "active", True
                ctx.plan = Plan((), ("no deployment is ready: the engines are starting or restarting",))
                return ctx.plan.reasons[0]
            ctx.route, skipped = "fallback", f"engine: {rt.active.name} is not ready, fallback answers"
        ctx.plan = plan_request(
            remaining_ms=(ctx.deadline - perf()) * 1000, route=ctx.route, max_tokens=ctx.max_tokens,
            has_fallback=has_fallback, rung=self.ladder.actions_for(self.call.tenant),
            est_active=self.estimator.get(rt.active.key),
            est_fallback=self.estimator.get(rt.fallback.key) if rt.fallback else None,
            min_attempt_ms=s.min_attempt_ms, fallback_reserve_ms=s.fallback_reserve_ms)
        if skipped:
            ctx.plan = Plan(ctx.plan.attempts, (skipped, *(r for r in ctx.plan.reasons if not r.startswith("breaker"))))
        return "; ".join(ctx.plan.reasons) or "budget too small"

    def each(self):
        """The plan's attempts that still have budget: (attempt, window_s, deployment, request, trimmed)."""
        n = len(self.ctx.plan.attempts)
        for i, att in enumerate(self.ctx.plan.attempts):
            window = self.window(att, i == n - 1)
            if window is None:
                return
            dep, req, trimmed = self.request(att)
            self.ctx.tried.append(att.target)
            yield att, window, dep, req, trimmed

    def window(self, att, last: bool) -> float | None:
        """Seconds this attempt may take; None when too little budget is left to start it."""
        left = self.ctx.deadline - perf()
        if left * 1000 < self.rt.serving.min_attempt_ms:
            return None
        return left if last else min(left, att.timeout_ms / 1000)

    def request(self, att) -> tuple[Deployment, GenRequest, bool]:
        call = self.call
        dep = self.rt.deployment(att.target)
        msgs, trimmed = call.messages, False
        if att.context_chars is not None and len(call.messages[-1]["content"]) > att.context_chars:
            msgs = [*call.messages[:-1], {"role": call.messages[-1]["role"],
                                          "content": trim_context(call.messages[-1]["content"], att.context_chars)}]
            trimmed = True
        n = min(att.max_tokens, dep.max_tokens) if dep.max_tokens else att.max_tokens
        return dep, GenRequest(msgs, n, call.temperature, call.top_p, call.stop, call.seed,
                               ignore_eos=call.ignore_eos), trimmed

    def expected_ms(self, dep: Deployment, tokens: int) -> float:
        """How long an attempt must have had before its timeout says something about the upstream."""
        est = self.estimator.get(dep.key)
        return max(MIN_TIMEOUT_EVIDENCE_MS, 2 * est.predict_ms(tokens)) if est else self.rt.serving.default_budget_ms / 2

    def failed(self, att, kind: str, t_a: float, why: str, window_s: float) -> None:
        ctx = self.ctx
        dep = self.rt.deployment(att.target)
        series = self.metrics.for_deployment(dep)
        series.error(kind)
        series.upstream(kind, perf() - t_a)
        if att.target == "active" and upstream_fault(kind, window_s * 1000, self.expected_ms(dep, att.max_tokens)):
            ctx.fault = True
            self.ladder.observe(Sample(self.clock(), (perf() - t_a) * 1000, False))
            self.rt.observe(kind)  # a running canary's window: the upstream's own faults, as the ladder's
        ctx.path.append(f"{att.target}:{kind}")
        self.charge(dep, kind, ctx.tokens_in, 0)  # a timeout's prompt was the upstream's work
        log.info("trace %s: %s failed on %s (%s): %s", self.call.trace_id, ctx.route, dep.key, kind, why)

    def charge(self, dep: Deployment, ended: str, tokens_in: int, tokens_out: int) -> float:
        """Charge the request for one attempt on `dep` that ended so (serve/charges.py); its USD."""
        tin, tout = charged(ended, tokens_in, tokens_out)
        return self.ctx.charge(dep.price or self.rt.serving.price, tin, tout) if tin or tout else 0.0

    def succeeded(self, att, res: GenResult, trimmed: bool, t_a: float, cut: bool = False) -> Answer:
        call, ctx = self.call, self.ctx
        dep = self.rt.deployment(att.target)
        cost = self.charge(dep, "cut" if cut else "answered", res.tokens_in, res.tokens_out)
        ctx.reservation.settle(ctx.used_tokens, ctx.used_usd, self.wall())  # with what earlier attempts cost
        self.estimator.observe(dep.key, res.ttft_ms, res.generation_ms, res.tokens_out)
        t_end = perf()
        if att.target == "active":
            # the engine's health, not the answer's length (ladder.health_ms)
            latency = health_ms((t_end - t_a) * 1000, res.generation_ms, res.tokens_out,
                                self.ladder.spec.reference_tokens)
            self.ladder.observe(Sample(self.clock(), latency, True, cost))
            self.rt.observe("ok", res.ttft_ms, latency)
        series = self.metrics.for_deployment(dep)
        series.upstream("ok", t_end - t_a)
        series.tokens_in.inc(res.tokens_in)
        series.tokens_out.inc(res.tokens_out)
        series.cost.inc(cost)
        reasons = list(ctx.plan.reasons) + (["ladder: context trimmed"] if trimmed else [])
        ctx.path.append(f"{att.target}:truncated" if cut else att.target)
        full = dep is ctx.lookup and att.max_tokens >= ctx.max_tokens and not trimmed and not cut
        if not full or len(ctx.path) > 1:
            series.degraded(">".join(ctx.path) + ("+reduced" if not full else ""))
        elif ctx.key is not None and self.cache is not None:
            self.cache.put_soon(ctx.key, {"text": res.text, "tokens_in": res.tokens_in, "tokens_out": res.tokens_out,
                                          "finish_reason": res.finish_reason})
        total = t_end - call.t0
        series.request(call.route, "ok" if len(ctx.path) == 1 and not reasons else "degraded", total)
        return Answer(res.text, dep, False, self.ladder.level, ctx.path, reasons, res.tokens_in, res.tokens_out,
                      cost, res.finish_reason, ctx.budget_ms, queue_ms=(ctx.t_admit - call.t0) * 1000,
                      upstream_ms=(t_a - ctx.t_admit) * 1000 + res.ttft_ms, generation_ms=res.generation_ms,
                      total_ms=total * 1000)

    def give_up(self, last_kind: str | None, why: str) -> GatewayError:
        """The error a client gets when no attempt answered. Upstream details (hosts, stderr, bodies)
        stay in the log, under the trace id the client is given."""
        call, ctx = self.call, self.ctx
        total = perf() - call.t0
        series = self.metrics.for_deployment(self.rt.active)
        if last_kind in ("rejected", "invalid"):
            series.request(call.route, "bad_request", total)
            log.warning("trace %s: request refused (%s): %s", call.trace_id, " > ".join(ctx.path), why)
            return GatewayError(400, "invalid_request_error",
                                f"messages: the model cannot take this request (trace id {call.trace_id})",
                                "messages", extra={"path": ctx.path})
        if ctx.unready:
            series.request(call.route, "unavailable", total)
            return GatewayError(503, "engine_unavailable",
                                f"no deployment is ready to answer (its engine is starting or restarting); retry "
                                f"after Retry-After (trace id {call.trace_id})", None, {"Retry-After": "2"},
                                extra={"path": ctx.path})
        if last_kind in (None, "timeout"):
            self.metrics.budget_exhausted.labels(call.route).inc()
            series.request(call.route, "budget_exhausted", total)
            return GatewayError(504, "budget_exhausted",
                                f"no answer within budget_ms={ctx.budget_ms} "
                                f"(tried: {' > '.join(ctx.path) or 'nothing'}; "
                                f"{why}); retry with a larger budget_ms or later", "budget_ms",
                                extra={"path": ctx.path})
        series.request(call.route, "error", total)
        log.warning("trace %s: every deployment failed (%s): %s", call.trace_id, " > ".join(ctx.path), why)
        return GatewayError(502, "upstream_error", f"every deployment failed ({' > '.join(ctx.path)}); "
                            f"the gateway log has the details under trace id {call.trace_id}",
                            extra={"path": ctx.path})

    def probe_done(self, ok: bool) -> None:
        """Report a half-open breaker's probe; a probe that never reached the active deployment
        (budget gone first), or failed through the client's doing, only frees the probe slot: it
        is no evidence either way."""
        ctx = self.ctx
        if ctx.route != "probe":
            return
        if "active" in ctx.tried and (ok or ctx.fault):
            self.apply(self.ladder.probe_done(ok, self.clock()))
        else:
            self.ladder.probe_abandoned()

    def client_closed(self) -> None:
        """The client left: recorded as `client_closed` (the attempt it left during charged itself)."""
        call, ctx = self.call, self.ctx
        if ctx.lookup is None:
            return
        self.metrics.for_deployment(ctx.lookup).request(call.route, "client_closed", perf() - call.t0)
        log.info("trace %s: client closed the connection (%d tokens charged)", call.trace_id, ctx.used_tokens)

    # ------------------------------------------------------------------ the plain path
    async def answer(self) -> Answer:
        """Try the plan's attempts in order; the first answer wins, else the last failure's error."""
        ok, last_kind = False, None
        try:
            why = self.plan()
            for att, window, dep, req, trimmed in self.each():
                prov = self.rt.providers[att.target]
                t_a = perf()
                try:
                    res = await generate_within(prov, req, window)
                except asyncio.CancelledError:  # the client left while the upstream worked on its prompt
                    self.charge(dep, "client_closed", self.ctx.tokens_in, 0)
                    raise
                except asyncio.TimeoutError:
                    last_kind, why = "timeout", f"{dep.name} took longer than {window * 1000:.0f} ms"
                except ProviderError as exc:
                    last_kind, why = exc.kind, str(exc)
                except Exception as exc:  # noqa: BLE001 - a provider bug is an upstream error, not a crash
                    last_kind, why = "error", f"{type(exc).__name__}: {exc}"
                else:
                    ok = att.target == "active"
                    return self.succeeded(att, res, trimmed, t_a)
                self.failed(att, last_kind, t_a, why, window)
            raise self.give_up(last_kind, why)
        finally:
            self.probe_done(ok)
