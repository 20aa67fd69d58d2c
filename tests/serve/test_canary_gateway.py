"""The gateway runs a canary (serve/canary_run.py): a real gateway on loopback, real HTTP, mock providers
(and one real fake-engine process), the manifest file as the only place decisions go.

Every wait is on a condition (the manifest's canary state, an engine's readiness) with a deadline;
traffic is what moves a canary, so the helpers send batches of requests until the condition holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

import aiohttp
import pytest

from gwkit import metric, mock
from quantgate.serve.manifest import load_manifest

pytestmark = pytest.mark.timeout(120)

CASES = [{"id": "who", "prompt": "who are you?", "checks": [{"type": "not_contains", "value": "[wrong]"}]},
         {"id": "what", "prompt": "what do you do?", "checks": [{"type": "min_len", "value": 3}]}]


def canary_manifest(challenger: dict, steps=(20, 50, 100), **canary) -> dict:
    c = {"challenger": challenger, "steps": list(steps), "step_started": datetime.now(timezone.utc).isoformat(),
         "min_requests": 20, "min_fail_requests": 10, "min_seconds": 0, "eval_interval_s": 0.02,
         "gates": {"latency_slack_ms": 250}, "probes": {"cases": CASES, "every_s": 0.05}, **canary}
    return {"schema_version": 2, "active": mock("stable", reply_tokens=8),
            "serving": {"default_budget_ms": 3000, "max_budget_ms": 10000, "max_concurrency": 64, "anonymous": True,
                        "reload_interval_s": 0.05, "cache": {"enabled": False}},
            "canary": c}


async def _batch(s, url: str, start: int, n: int) -> list[tuple[int, dict]]:
    async def one(i):
        async with s.post(url + "/chat", json={"user_id": f"u{i}", "prompt": f"question {i}"}) as r:
            return r.status, await r.json(content_type=None)
    return await asyncio.gather(*(one(i) for i in range(start, start + n)))


def drive(srv, path, done, max_requests: int = 3000, batch: int = 20, deadline_s: float = 90):
    """Send traffic from distinct users until done(manifest) holds; returns (requests sent, failed answers,
    deployments that answered)."""
    async def go():
        sent, failed, served = 0, [], {}
        end = time.monotonic() + deadline_s
        async with aiohttp.ClientSession() as s:
            while not done(load_manifest(path)):
                if sent >= max_requests or time.monotonic() > end:
                    raise AssertionError(f"after {sent} requests the canary is still {load_manifest(path).canary}")
                for status, body in await _batch(s, srv.url, sent, batch):
                    if status != 200:
                        failed.append((status, body))
                    else:
                        served[body["deployment"]] = served.get(body["deployment"], 0) + 1
                sent += batch
        return sent, failed, served
    return asyncio.run(go())


def ended(state):
    return lambda m: m.canary.state == state


def wait_for(predicate, what: str, timeout_s: float = 60):
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def again(serve, path):
    """Another gateway on the manifest as the file has it now (a restart, or a second replica)."""
    return serve(json.loads(path.read_text()))


def test_a_good_canary_is_promoted_through_every_step(serve, manifest_path):
    srv = serve(canary_manifest(mock("good", reply_tokens=8)))
    ok, ready = srv.call(srv.gateway.readiness())
    assert ok and {k: ready["canary"][k] for k in ("challenger", "step", "weight", "serving")} == {
        "challenger": "good@1", "step": 0, "weight": 20, "serving": True}
    sent, failed, served = drive(srv, manifest_path, ended("promoted"))
    m = load_manifest(manifest_path)
    assert not failed
    assert m.active.name == "good" and m.previous[0].name == "stable"
    assert [(e.what, e.weight) for e in m.canary.history] == [("step", 50), ("step", 100), ("promote", 100)]
    for e in m.canary.history:  # each decision carries the figures it rested on
        assert e.figures["canary"]["requests"] >= 20 and e.figures["canary"]["error_rate"] == 0
        assert e.figures["canary"]["probes"].split("/")[1] != "0"
    assert served.get("good", 0) > 0 and served.get("stable", 0) > 0
    wait_for(lambda: srv.gateway.rt.active.name == "good", "the gateway to serve the promoted challenger")
    text = srv.gateway.metrics.render().decode()
    assert metric(text, "quantgate_canary_attempts_total", arm="canary", outcome="ok") >= 60
    assert metric(text, "quantgate_canary_probes_total", arm="canary", result="pass") >= 2


def test_a_canary_with_a_higher_error_rate_is_rolled_back_and_clients_never_see_it(serve, manifest_path):
    # no probes: its failed probes would roll it back too; here the requests' error rate must
    srv = serve(canary_manifest(mock("flaky", reply_tokens=8, error_rate=0.5, seed=3), probes={"cases": []}))
    sent, failed, served = drive(srv, manifest_path, ended("rolled_back"))
    m = load_manifest(manifest_path)
    assert m.active.name == "stable" and "error rate" in m.canary.history[-1].why
    assert m.history[-1].what == "canary rollback" and m.history[-1].figures["canary"]["error_rate"] > 0.2
    assert not failed  # the stable answered every attempt the canary failed (its fallback on the canary arm)
    assert sent <= 400


def test_a_slower_canary_is_rolled_back_on_latency(serve, manifest_path):
    srv = serve(canary_manifest(mock("slow", reply_tokens=8, delay_ms=400)))
    drive(srv, manifest_path, ended("rolled_back"))
    why = load_manifest(manifest_path).canary.history[-1].why
    assert "TTFT" in why or "E2E" in why, why


def test_a_canary_answering_the_regression_set_wrongly_is_rolled_back_by_its_probes(serve, manifest_path):
    # its answers start with "[wrong]", which the first case forbids; every request would succeed
    srv = serve(canary_manifest(mock("wrong", reply_tokens=8), min_requests=10_000))
    wait_for(lambda: load_manifest(manifest_path).canary.state == "rolled_back", "the probes to roll it back")
    c = load_manifest(manifest_path).canary
    assert "probe pass rate 0.500" in c.history[-1].why and c.history[-1].figures["stable"]["probe_pass_rate"] == 1
    assert srv.gateway.canary.rounds <= 2
    wait_for(lambda: srv.gateway.rt.canary is None, "the gateway to reload without the canary")
    assert "canary" not in srv.call(srv.gateway.readiness())[1]


def test_a_restarted_gateway_resumes_the_canary_at_the_same_step(serve, manifest_path):
    srv = serve(canary_manifest(mock("good", reply_tokens=8)))
    drive(srv, manifest_path, lambda m: m.canary.step == 1)
    srv.stop()
    assert load_manifest(manifest_path).canary.step == 1
    srv2 = again(serve, manifest_path)
    assert srv2.gateway.rt.canary.step == 1 and srv2.gateway.rt.canary.weight == 50
    drive(srv2, manifest_path, ended("promoted"))
    m = load_manifest(manifest_path)
    assert [(e.what, e.weight) for e in m.canary.history] == [("step", 50), ("step", 100), ("promote", 100)]
    decided = lambda g, action: metric(g.metrics.render().decode(), "quantgate_canary_decisions_total", action=action)
    assert decided(srv.gateway, "step") == 1 and decided(srv.gateway, "promote") == 0  # 20 → 50 only
    assert decided(srv2.gateway, "step") == 1 and decided(srv2.gateway, "promote") == 1  # 50 → 100 → promoted


def test_a_crashing_canary_engine_is_rolled_back_with_no_failed_client_request(serve, manifest_path, tmp_path):
    from test_serve_engines import engine_dep

    challenger = engine_dep(tmp_path, "crashy", "--crash-after", "5")
    srv = serve(canary_manifest(challenger, steps=(50, 100), probes={"cases": []}))
    wait_for(lambda: srv.gateway.rt.providers["canary"].available, "the canary engine to be ready")
    # one request at a time, so some are answered before the crash (which drops every one in flight)
    sent, failed, served = drive(srv, manifest_path, ended("rolled_back"), batch=1)
    c = load_manifest(manifest_path).canary
    assert not failed, failed[:3]
    assert c.history[-1].why.startswith("challenger engine: engine "), c.history[-1].why
    assert served.get("crashy", 0) >= 1  # it did serve before it crashed
    wait_for(lambda: srv.gateway.rt.canary is None, "the gateway to reload without the canary")


def test_probes_wait_for_both_engines_to_be_ready(serve, manifest_path, tmp_path):
    """A stable whose engine is still starting would fail every probe: that is no evidence against its answers
    (it had biased the probe gate towards the canary, 1/45 against 45/45 on real vLLM)."""
    from test_serve_engines import engine_dep

    m = canary_manifest(mock("good", reply_tokens=8), min_requests=10_000)
    m["active"] = engine_dep(tmp_path, "stable", "--ready-after", "1.0")
    srv = serve(m)
    assert not srv.gateway.rt.available("active")  # starting: the rounds so far probed nothing
    wait_for(lambda: srv.gateway.rt.available("active"), "the stable engine to be ready")
    start = srv.gateway.canary.rounds
    wait_for(lambda: srv.gateway.canary.rounds >= start + 3, "three probe rounds on ready engines")
    text = srv.gateway.metrics.render().decode()
    assert metric(text, "quantgate_canary_probes_total", arm="stable", result="pass") >= 6
    assert metric(text, "quantgate_canary_probes_total", arm="stable", result="fail") == 0
    assert load_manifest(manifest_path).canary.state == "running"


def test_a_probe_round_that_never_ends_does_not_hold_up_a_rollback(serve, manifest_path, monkeypatch):
    """Probes that hang (an injected fault: each waits for ever) must not stop the windows' decisions."""
    from quantgate.serve import canary_run

    async def hung(*args, **kwargs):
        await asyncio.Event().wait()

    monkeypatch.setattr(canary_run, "_probe", hung)
    srv = serve(canary_manifest(mock("flaky", reply_tokens=8, error_rate=0.5, seed=3)))
    sent, failed, served = drive(srv, manifest_path, ended("rolled_back"), deadline_s=30)
    assert "error rate" in load_manifest(manifest_path).canary.history[-1].why
    assert srv.gateway.canary.rounds == 0 and not failed


def test_a_challenger_failing_its_checksum_takes_no_traffic_and_is_rolled_back(serve, manifest_path, tmp_path):
    from test_serve_engines import engine_dep

    challenger = engine_dep(tmp_path, "tampered")
    (tmp_path / "art-tampered" / "model.safetensors").write_bytes(b"changed")
    srv = serve(canary_manifest(challenger))
    wait_for(lambda: load_manifest(manifest_path).canary.state == "rolled_back", "the rollback")
    assert "checksum" in load_manifest(manifest_path).canary.history[-1].why.lower()
    assert srv.gateway.rt.active.name == "stable"


def test_two_gateways_on_one_manifest_take_each_step_once(serve, manifest_path):
    """Replicas sharing the manifest file: whoever decides first writes; the other's decision about a step
    the file has left is dropped, and it follows the file (its windows restart at the new step)."""
    a = serve(canary_manifest(mock("good", reply_tokens=8)))
    b = again(serve, manifest_path)

    async def both(s, start, n):
        ra, rb = await asyncio.gather(_batch(s, a.url, start, n), _batch(s, b.url, start + n, n))
        return ra + rb

    async def go():
        sent = 0
        async with aiohttp.ClientSession() as s:
            while load_manifest(manifest_path).canary.state != "promoted":
                assert sent < 4000, load_manifest(manifest_path).canary
                assert all(status == 200 for status, _ in await both(s, sent, 10))
                sent += 20
    asyncio.run(go())
    m = load_manifest(manifest_path)
    assert [(e.what, e.weight) for e in m.canary.history] == [("step", 50), ("step", 100), ("promote", 100)]
    assert [e.what for e in m.history].count("promote") == 1
    wait_for(lambda: a.gateway.rt.active.name == b.gateway.rt.active.name == "good", "both to serve the challenger")


def test_a_canary_engine_that_never_gets_ready_is_rolled_back_and_takes_no_traffic(serve, manifest_path, tmp_path):
    from test_serve_engines import engine_dep

    challenger = engine_dep(tmp_path, "sleepy", "--never-ready")
    srv = serve(canary_manifest(challenger, ready_timeout_s=0.5, probes={"cases": []}))
    sent, failed, served = drive(srv, manifest_path, ended("rolled_back"), batch=5)
    why = load_manifest(manifest_path).canary.history[-1].why
    assert why == "challenger engine: engine not ready after 0.5 s", why
    assert not failed and set(served) == {"stable"}


def test_two_replicas_on_one_redis_follow_one_decision(tmp_path):
    """Each replica its own manifest file and its own windows; Redis (serving.state) holds one decision per
    step, claimed by the first replica to decide it, adopted by the other with its figures."""
    import shutil

    from gwkit import RedisServer, write
    from quantgate.serve.server import ServerThread

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    redis = RedisServer(binary, tmp_path).start()
    m = canary_manifest(mock("good", reply_tokens=8))
    m["serving"]["state"] = {"redis": redis.url}
    paths = [write((tmp_path / r).mkdir() or tmp_path / r / "manifest.json", m) for r in ("a", "b")]
    srvs = [ServerThread(p).start() for p in paths]
    try:
        async def go():
            sent = 0
            async with aiohttp.ClientSession() as s:
                while not all(load_manifest(p).canary.state == "promoted" for p in paths):
                    assert sent < 4000, [load_manifest(p).canary.history for p in paths]
                    got = await asyncio.gather(*(_batch(s, srv.url, sent + 10 * i, 10) for i, srv in enumerate(srvs)))
                    assert all(status == 200 for batch in got for status, _ in batch)
                    sent += 20
        asyncio.run(go())
        a, b = ([(e.what, e.weight, e.why, e.when, e.figures) for e in load_manifest(p).canary.history] for p in paths)
        assert [x[:2] for x in a] == [("step", 50), ("step", 100), ("promote", 100)]
        assert a == b  # the same decisions, with the same figures (one replica's windows) and times
        text = srvs[0].gateway.metrics.render().decode() + srvs[1].gateway.metrics.render().decode()
        assert metric(text, "quantgate_redis_round_trips_total", op="canary") >= 3
    finally:
        for srv in srvs:
            srv.stop()
        redis.stop()


def test_a_replica_whose_redis_does_not_answer_holds_rather_than_step_alone(serve, manifest_path, tmp_path):
    """Redis stopped (an injected fault): the replica keeps serving, but takes no step on its own figures,
    since another replica may be deciding that step otherwise; once Redis answers again the canary goes on."""
    import shutil

    from gwkit import RedisServer

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    redis = RedisServer(binary, tmp_path).start()
    m = canary_manifest(mock("good", reply_tokens=8))
    m["serving"]["state"] = {"redis": redis.url, "retry_s": 0.05}
    redis.stop()
    try:
        srv = serve(m)
        last = lambda: srv.gateway.canary.last
        held = lambda _m: last() is not None and "shared state does not answer" in last().reason
        sent, failed, _ = drive(srv, manifest_path, held, deadline_s=30)
        assert not failed and last().action == "hold" and last().reason.startswith("step waits")
        c = load_manifest(manifest_path).canary
        assert c.step == 0 and c.history == []
        redis.start()
        sent, failed, _ = drive(srv, manifest_path, ended("promoted"))
        assert not failed
        assert [(e.what, e.weight) for e in load_manifest(manifest_path).canary.history] == [
            ("step", 50), ("step", 100), ("promote", 100)]
    finally:
        redis.stop()
