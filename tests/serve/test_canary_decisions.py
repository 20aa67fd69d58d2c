"""The canary's pure decisions (serve/canary.py) and its manifest block: no server, no clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from quantgate.errors import QuantgateError
from quantgate.serve import canary as cn
from quantgate.serve.manifest import CanarySpec, Deployment, Manifest, ManifestError, parse_manifest

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CASES = [{"id": "capital", "prompt": "capital of France?", "checks": [{"type": "contains", "value": "Paris"}]}]


def dep(name: str) -> Deployment:
    return Deployment(name=name, provider={"kind": "mock"})


def spec(**kw) -> CanarySpec:
    base = dict(challenger=dep("new"), steps=[5, 25, 50, 100], step_started=T0, min_requests=100, min_seconds=60,
                min_fail_requests=20)
    return CanarySpec(**{**base, **kw})


def window(n: int, errors: int = 0, timeouts: int = 0, ms: float = 10.0, probes=(0, 0)) -> cn.Window:
    w = cn.Window()
    for i in range(n - errors - timeouts):
        w.ok(ms, ms * 2)
    for _ in range(errors):
        w.failed("error")
    for _ in range(timeouts):
        w.failed("timeout")
    w.probes_passed, w.probes_total = probes
    return w


LATER = T0 + timedelta(seconds=61)


def test_a_good_canary_steps_up_and_promotes_at_the_last_step():
    d = cn.decide(spec(), window(1000), window(100), now=LATER)
    assert d.action == "step", d.reason
    assert d.figures["canary"]["requests"] == 100 and d.figures["stable"]["error_rate"] == 0
    assert cn.decide(spec(step=3), window(0), window(100), now=LATER).action == "promote"


@pytest.mark.parametrize("stable,canary,now,why", [
    (window(1000), window(99), LATER, "99/100 canary requests"),
    (window(1000), window(100), T0 + timedelta(seconds=59), "59/60 s"),
    (window(5), window(100), LATER, "5/20 stable requests"),
])
def test_too_few_samples_or_too_little_time_holds(stable, canary, now, why):
    d = cn.decide(spec(), stable, canary, now=now)
    assert d.action == "hold" and why in d.reason


def test_a_higher_error_rate_rolls_back_early_only_when_significant():
    # 20 canary requests, 10 errors against a clean stable: significant at once
    d = cn.decide(spec(), window(1000), window(20, errors=10), now=T0)
    assert d.action == "rollback" and "error rate" in d.reason and "z=" in d.reason
    # 1 error in 20 (5% > 2% + stable 0%) is not significant yet: hold for more samples
    assert cn.decide(spec(), window(1000), window(20, errors=1), now=LATER).action == "hold"
    # ... but at min_requests the excess alone decides
    assert cn.decide(spec(), window(1000), window(100, errors=5), now=LATER).action == "rollback"
    # the same error rate as stable's passes
    assert cn.decide(spec(), window(1000, errors=50), window(100, errors=5), now=LATER).action == "step"


def test_timeouts_are_the_budget_exhausted_gate():
    d = cn.decide(spec(), window(1000), window(40, timeouts=20), now=T0)
    assert d.action == "rollback" and "budget-exhausted rate" in d.reason


def test_a_slower_canary_rolls_back_on_latency():
    d = cn.decide(spec(), window(1000, ms=10), window(20, ms=200), now=T0)
    assert d.action == "rollback" and "TTFT" in d.reason and "median" in d.reason
    # within ratio × stable + slack: passes
    assert cn.decide(spec(), window(1000, ms=10), window(100, ms=20), now=LATER).action == "step"


def test_wrong_probe_answers_roll_back_after_one_round():
    c = spec(probes={"cases": CASES})
    assert cn.decide(c, window(1000, probes=(1, 1)), window(100), now=LATER).action == "hold"  # no round yet
    d = cn.decide(c, window(1000, probes=(1, 1)), window(3, probes=(0, 1)), now=T0)
    assert d.action == "rollback" and "probe pass rate 0.000" in d.reason
    assert cn.decide(c, window(1000, probes=(1, 1)), window(100, probes=(1, 1)), now=LATER).action == "step"


def test_an_engine_problem_rolls_back_whatever_the_figures():
    d = cn.decide(spec(), window(1000), window(100), now=LATER, engine_problem="exited with 3")
    assert d.action == "rollback" and d.reason == "challenger engine: exited with 3"


def test_arms_are_sticky_and_a_canary_user_stays_on_it_as_weights_grow():
    users = [f"u{i}" for i in range(2000)]
    at5 = {u for u in users if cn.arm_of(spec(step=0), "t", u) == "canary"}
    at25 = {u for u in users if cn.arm_of(spec(step=1), "t", u) == "canary"}
    assert 40 <= len(at5) <= 160 and 350 <= len(at25) <= 650
    assert at5 <= at25
    assert all(cn.arm_of(spec(step=0), "t", u) == "canary" for u in at5)  # the same answer every time
    assert all(cn.arm_of(spec(step=3), "t", u) == "canary" for u in users)
    assert cn.arm_of(spec(state="rolled_back"), "t", "u1") == "stable"
    assert cn.arm_of(None, "t", "u1") == "stable"


def manifest() -> Manifest:
    return Manifest(active=dep("old"))


def test_start_step_promote_keeps_stable_as_rollback_target_until_the_end():
    m = cn.start(manifest(), dep("new"), [5, 50, 100], now=T0, by="me", min_requests=10)
    assert m.active.name == "old" and m.canary.weight == 5 and m.canary.history[0].what == "start"
    d = cn.Decision("step", "passes", {"x": 1})
    m = cn.record(m, d, now=LATER, by="gw", step=0)
    assert m.canary.step == 1 and m.canary.step_started == LATER and m.history[-1].figures == {"x": 1}
    assert cn.record(m, d, now=LATER, by="gw", step=0) is None  # stale: decided at a step that is gone
    m = cn.record(m, d, now=LATER, by="gw", step=1)
    m = cn.record(m, cn.Decision("promote", "passes", {}), now=LATER, by="gw", step=2)
    assert m.active.name == "new" and m.previous[0].name == "old" and m.canary.state == "promoted"
    assert [e.what for e in m.canary.history] == ["start", "step", "step", "promote"]
    assert [e.what for e in m.history][-2:] == ["canary promote", "promote"]
    assert parse_manifest(m.model_dump_json()).canary.state == "promoted"  # it round-trips


def test_rollback_and_abort_leave_the_stable_active():
    m = cn.start(manifest(), dep("new"), [5, 100], now=T0, by="me")
    r = cn.record(m, cn.Decision("rollback", "error rate too high", {"f": 2}), now=LATER, by="gw", step=0)
    assert r.active.name == "old" and r.canary.state == "rolled_back" and r.canary.weight == 0
    assert r.history[-1].what == "canary rollback" and "error rate" in r.history[-1].why
    a = cn.abort(m, now=LATER, by="me", reason="looks off")
    assert a.active.name == "old" and a.canary.state == "rolled_back"
    with pytest.raises(QuantgateError, match="no canary is running"):
        cn.abort(a, now=LATER, by="me", reason="again")
    assert cn.advance(m, now=LATER, by="me", reason="ok").canary.step == 1
    assert cn.advance(cn.advance(m, now=LATER, by="me", reason="ok"), now=LATER, by="me", reason="ok").active.name == "new"
    with pytest.raises(QuantgateError, match="already running"):
        cn.start(m, dep("other"), [100], now=T0, by="me")


@pytest.mark.parametrize("steps,msg", [([5, 5, 100], "increase"), ([5, 50], "last step must be 100"),
                                       ([0, 100], r"\(0, 100\]")])
def test_a_bad_schedule_is_refused_naming_the_field(steps, msg):
    doc = {"schema_version": 2, "active": {"name": "old"},
           "canary": {"challenger": {"name": "new"}, "steps": steps, "step_started": T0.isoformat()}}
    with pytest.raises(ManifestError, match=msg):
        parse_manifest(__import__("json").dumps(doc))


def test_a_plain_promote_waits_for_the_canary_and_a_rollback_ends_it():
    from quantgate.serve.promote import promote, rollback

    m = cn.start(promote(manifest(), dep("older"), now=T0, by="me"), dep("new"), [5, 100], now=T0, by="me")
    with pytest.raises(QuantgateError, match="canary abort"):
        promote(m, dep("other"), now=LATER, by="me")
    r = rollback(m, now=LATER, by="me", reason="incident")
    assert r.active.name == "old" and r.canary.state == "rolled_back" and r.canary.weight == 0
    assert "older@1 was rolled back" in r.canary.history[-1].why
