"""Tenant-fair degradation (issue 19, finding 2): the ladder reads the engine's health (time to first
token, pace, errors), not the length a client asked for, and its light and moderate rungs cut the
tenants that cause the pressure before anyone else. The audit's reproduction: six answers of 900
tokens moved the shared ladder to heavy, cutting another tenant's max_tokens 200 → 50."""

from __future__ import annotations

import asyncio

import aiohttp
from gwkit import base_manifest, chat_body, ladder_level, mock, post

from quantgate.serve.ladder import Ladder, Level, Sample, health_ms
from quantgate.serve.manifest import LadderSpec
from quantgate.serve.pressure import TenantUsage, culprits

LADDER = {"min_samples": 5, "eval_interval_s": 60, "window_s": 600, "hold_s": 600,
          "light": {"p95_ms": 200, "max_tokens_factor": 0.5}, "moderate": {"p95_ms": 300, "max_tokens_factor": 0.5},
          "heavy": {"p95_ms": 400, "max_tokens_factor": 0.25, "concurrency_factor": 0.5},
          "breaker": {"error_rate": 0.9}}


def _ask(srv, asks: list[tuple[str, int]]) -> list:
    async def main():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*[post(s, srv.url + "/chat", chat_body(f"q{i}", max_tokens=n),
                                               headers={"x-tenant": t}) for i, (t, n) in enumerate(asks)])
    return asyncio.run(main())


def test_one_tenants_long_answers_at_a_healthy_pace_do_not_degrade_anyone(serve):
    m = base_manifest(ladder=LADDER, cache={"enabled": False})
    m["active"] = mock("primary", delay_ms=10, tokens_per_s=2000, reply_tokens=1000)  # 900 tokens: ~460 ms
    srv = serve(m)
    for status, body, _, _ in _ask(srv, [("greedy", 900)] * 6):
        assert status == 200 and body["tokens"]["out"] == 900
    assert ladder_level(srv) == Level.NORMAL  # was heavy: the E2E of a long answer read as a slow engine
    (status, body, _, _), = _ask(srv, [("quiet", 200)])
    assert status == 200 and body["tokens"]["out"] == 200 and body["degrade"]["level"] == "normal"
    assert srv.gateway.gate.limit == 32


def test_a_slow_engine_still_moves_the_ladder_and_its_heaviest_tenant_is_cut_first(serve):
    """The control: a slow first token is the engine's health, whatever the answer's length; at the
    light rung only the tenant that used most of the engine gets the cut."""
    m = base_manifest(ladder=LADDER, cache={"enabled": False}, default_budget_ms=5000)
    m["active"] = mock("primary", delay_ms=250, reply_tokens=1000)
    srv = serve(m)
    _ask(srv, [("greedy", 900)] * 5 + [("quiet", 20)])
    assert ladder_level(srv) == Level.LIGHT and srv.gateway.ladder.culprits == {"greedy"}
    (_, greedy, _, _), (_, quiet, _, _) = _ask(srv, [("greedy", 200), ("quiet", 200)])
    assert greedy["tokens"]["out"] == 100 and quiet["tokens"]["out"] == 200


def test_health_ms_keeps_the_first_token_and_scales_only_the_generation_past_the_reference():
    assert health_ms(300, 200, 100, 256) == 300                      # within the reference: as it was
    assert health_ms(1010, 1000, 1000, 250) == 10 + 250               # long, healthy pace: its TTFT + 250 tokens
    assert health_ms(1500, 1000, 1000, 250) == 500 + 250              # long, slow first token: still slow
    assert health_ms(2000, 0, 1000, 250) == 500                       # an answer that came whole: scaled whole
    assert health_ms(2000, 0, 1000, 250) < health_ms(2000, 0, 250, 250)


def test_culprits_are_the_tenants_far_over_their_fair_share():
    assert culprits({}) == frozenset()
    assert culprits({"a": 5.0}) == {"a"}
    assert culprits({"a": 90.0, "b": 10.0}) == {"a"}
    assert culprits({t: 10.0 for t in "abcdefghij"}) == frozenset()  # evenly spread: nobody stands out
    assert culprits({"a": 30.0, **{t: 70 / 9 for t in "bcdefghij"}}) == {"a"}
    u = TenantUsage(window_s=10)
    u.observe("a", 1000, 0.0)
    u.observe("b", 10, 200.0)
    assert set(u.at(200.0)) == {"b"}  # a stopped twenty windows ago: forgotten


def test_light_and_moderate_cut_the_culprits_only_heavy_cuts_everyone():
    lad = Ladder(LadderSpec.model_validate(LADDER), 0.0)
    for i in range(6):
        lad.observe(Sample(1 + i * 0.01, 250, True))
    lad.observe_usage("greedy", 5000, 1.0)
    lad.observe_usage("quiet", 100, 1.0)
    assert lad.evaluate(2.0)[0].to == Level.LIGHT
    assert lad.actions_for("greedy").max_tokens_factor == 0.5 and lad.actions_for("quiet") is None
    lad.observe_usage("quiet", 5000, 2.0)  # now nobody stands out: the cut is everyone's
    lad.evaluate(2.1)
    assert lad.actions_for("quiet") is not None and lad.actions_for("greedy") is not None
    lad.observe_usage("greedy", 50_000, 2.2)
    for i in range(6):
        lad.observe(Sample(2.2 + i * 0.01, 450, True))
    assert lad.evaluate(2.3)[0].to == Level.HEAVY
    assert lad.actions_for("quiet").max_tokens_factor == 0.25
