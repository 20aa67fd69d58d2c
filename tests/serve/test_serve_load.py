"""Concurrency, budgets, the OpenAI-compatible API, the ladder and hot rollback, over real HTTP.

Requests are held inside the mock provider with its `hold` event and counted with its `entered`
counter, so the tests know when N requests are in flight without sleeping.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from gwkit import base_manifest, chat_body, hold, metric, mock, oai_body, parse_sse, post, release, until, write


def test_past_the_concurrency_limit_clients_get_fast_429s_and_nobody_is_lost(serve):
    srv = serve(base_manifest(max_concurrency=3, cache={"enabled": False}))
    ev = hold(srv)
    prov = srv.gateway.rt.providers["active"]

    async def main():
        async with aiohttp.ClientSession() as s:
            held = [asyncio.ensure_future(post(s, srv.url + "/chat", chat_body(f"held {i}", budget_ms=8000)))
                    for i in range(3)]
            await until(lambda: prov.entered == 3, what="3 requests inside the provider")
            extra = await asyncio.gather(*[post(s, srv.url + "/chat", chat_body(f"extra {i}")) for i in range(10)])
            text = await (await s.get(srv.url + "/metrics")).text()
            assert metric(text, "quantgate_in_flight") == 3
            release(srv, ev)
            return await asyncio.gather(*held), extra, text

    held, extra, text = asyncio.run(main())
    assert [h[0] for h in held] == [200] * 3
    for status, body, headers, secs in extra:
        assert status == 429 and body["error"]["type"] == "overloaded"
        assert int(headers["Retry-After"]) >= 1
        assert secs < 1.0          # answered at once, not after the held ones
    assert metric(text, "quantgate_429_total", reason="concurrency") == 10


def test_a_short_queue_absorbs_a_burst(serve):
    srv = serve(base_manifest(max_concurrency=1, queue={"size": 2, "max_wait_ms": 5000}, cache={"enabled": False}))
    ev = hold(srv)
    prov = srv.gateway.rt.providers["active"]

    async def main():
        async with aiohttp.ClientSession() as s:
            first = asyncio.ensure_future(post(s, srv.url + "/chat", chat_body("a", budget_ms=8000)))
            await until(lambda: prov.entered == 1, what="the first request inside")
            queued = [asyncio.ensure_future(post(s, srv.url + "/chat", chat_body(p, budget_ms=8000))) for p in "bc"]
            await until(lambda: srv.gateway.gate.queued == 2, what="two queued")
            rejected = await post(s, srv.url + "/chat", chat_body("d"))
            release(srv, ev)
            return await first, await asyncio.gather(*queued), rejected

    first, queued, rejected = asyncio.run(main())
    assert first[0] == 200 and [q[0] for q in queued] == [200, 200]
    assert rejected[0] == 429
    assert all(q[1]["latency_ms"]["queue"] > 0 for q in queued)


MARGIN_S = 0.35   # scheduling slack on a busy 2-core machine; the point is "not seconds late"


@pytest.mark.parametrize("active,kind", [
    (mock("slow", delay_ms=5000), "timeout"),                 # hangs (mock)
    ("hang", "timeout"), ("error-503", "error"), ("reset", "error"), ("garbage", "error"),   # a real upstream
])
def test_a_failing_or_hanging_upstream_is_degraded_within_the_budget(serve, upstream, active, kind):
    m = base_manifest(cache={"enabled": False})
    if isinstance(active, str):
        m["active"] = {"name": f"up-{active}", "provider": {"kind": "openai", "base_url": upstream.base_url,
                                                           "model": active, "timeout_s": 30}}
    else:
        m["active"] = active
    srv = serve(m)
    budget = 600

    async def main():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*[post(s, srv.url + "/chat", chat_body(f"p{i}", budget_ms=budget))
                                          for i in range(4)])

    for status, body, _, secs in asyncio.run(main()):
        assert status == 200, body
        assert body["deployment"] == "fallback"
        assert body["degrade"]["path"] == [f"active:{kind}", "fallback"]
        assert secs < budget / 1000 + MARGIN_S


def test_a_budget_the_active_cannot_meet_in_full_gets_fewer_tokens_first(serve):
    m = base_manifest(cache={"enabled": False})
    m["active"] = mock("paced", delay_ms=20, tokens_per_s=1000, reply_tokens=100)   # ~20 ms + 1 ms a token
    srv = serve(m)

    async def main():
        async with aiohttp.ClientSession() as s:
            for i in range(5):   # let the gateway measure the deployment
                assert (await post(s, srv.url + "/chat", chat_body(f"warm {i}", max_tokens=100)))[0] == 200
            return await post(s, srv.url + "/chat", chat_body("tight", max_tokens=100, budget_ms=200))

    status, body, _, secs = asyncio.run(main())
    assert status == 200 and body["deployment"] == "paced", body
    assert 1 < body["tokens"]["out"] < 100 and body["degrade"]["reasons"][0].startswith("budget: max_tokens 100→")
    assert secs < 0.2 + MARGIN_S


def test_a_tight_budget_keeps_falling_back_once_the_fallback_is_measured(serve):
    # regression: a measured fast fallback once shrank its reserve to nothing, turning fallbacks into 504s
    m = base_manifest(cache={"enabled": False})
    m["active"] = mock("slow", delay_ms=2000)
    srv = serve(m)

    async def main():
        async with aiohttp.ClientSession() as s:
            return [await post(s, srv.url + "/chat", chat_body(f"p{i}", budget_ms=80)) for i in range(10)]

    for status, body, _, secs in asyncio.run(main()):
        assert status == 200 and body["deployment"] == "fallback", body
        assert secs < 0.08 + MARGIN_S


def test_no_fallback_means_a_clear_budget_exhausted_answer_in_time(serve):
    m = base_manifest()
    del m["serving"]["fallback"]
    m["active"] = mock("slow", delay_ms=10_000)
    srv = serve(m)

    async def main():
        async with aiohttp.ClientSession() as s:
            r = await post(s, srv.url + "/chat", chat_body(budget_ms=300))
            text = await (await s.get(srv.url + "/metrics")).text()
            return r, text

    (status, body, _, secs), text = asyncio.run(main())
    assert status == 504 and body["error"]["type"] == "budget_exhausted" and body["error"]["param"] == "budget_ms"
    assert "budget_ms=300" in body["error"]["message"]
    assert secs < 0.3 + MARGIN_S
    assert metric(text, "quantgate_budget_exhausted_total", route="chat") == 1
    assert metric(text, "quantgate_upstream_errors_total", kind="timeout", deployment="slow") == 1


def openai_manifest(upstream, model: str = "ok", **serving) -> dict:
    m = base_manifest(**serving)
    m["active"] = {"name": "vllm-like", "model_version": "7",
                   "provider": {"kind": "openai", "base_url": upstream.base_url, "model": model}}
    return m


def test_openai_compatible_non_streaming(serve, upstream):
    srv = serve(openai_manifest(upstream))

    async def main():
        async with aiohttp.ClientSession() as s:
            return await post(s, srv.url + "/v1/chat/completions", oai_body("hi", max_tokens=5),
                              headers={"x-trace-id": "t-1"})

    status, body, headers, _ = asyncio.run(main())
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "vllm-like"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "stub answer: the quick brown fox "
                                             "jumps over the lazy dog"}
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 11, "total_tokens": 19}
    assert body["quantgate"]["trace_id"] == "t-1" and headers["x-trace-id"] == "t-1"
    assert body["quantgate"]["model_version"] == "7"


def test_openai_compatible_streaming(serve, upstream):
    srv = serve(openai_manifest(upstream, model="drip-1"))

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(srv.url + "/v1/chat/completions",
                              json=oai_body("hi", stream=True, max_tokens=6,
                                            stream_options={"include_usage": True})) as r:
                return r.status, r.headers["content-type"], await r.read()

    status, ctype, raw = asyncio.run(main())
    assert status == 200 and ctype.startswith("text/event-stream")
    events = parse_sse(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "the quick brown fox jumps over"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[0]["choices"][0]["finish_reason"] == "stop" and finals[0]["quantgate"]["deployment"] == "vllm-like"
    assert chunks[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}


def test_ignore_eos_reaches_an_openai_compatible_upstream_only_when_asked(serve, upstream):
    """A load test through the gateway must get the output length it asked for, as it does direct."""
    srv = serve(openai_manifest(upstream, model="drip-1", cache={"enabled": False}))

    async def main():
        bodies = []
        async with aiohttp.ClientSession() as s:
            for stream, extra in ((True, {"ignore_eos": True}), (False, {"ignore_eos": True}), (True, {})):
                async with s.post(srv.url + "/v1/chat/completions",
                                  json=oai_body("hi", stream=stream, max_tokens=4, **extra)) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                bodies.append(dict(upstream.stub.last_body))
        return bodies

    streamed, plain, without = asyncio.run(main())
    assert streamed["ignore_eos"] is True and plain["ignore_eos"] is True
    assert "ignore_eos" not in without  # an upstream that does not know the field never sees it


def test_streaming_is_cut_at_the_budget_and_falls_back_before_the_first_token(serve, upstream):
    srv = serve(openai_manifest(upstream, model="drip-100"))   # 100 ms a word

    async def main():
        async with aiohttp.ClientSession() as s:
            t = time.perf_counter()
            async with s.post(srv.url + "/v1/chat/completions",
                              json=oai_body("hi", stream=True, max_tokens=40, budget_ms=450)) as r:
                raw = await r.read()
            return raw, time.perf_counter() - t

    raw, secs = asyncio.run(main())
    events = parse_sse(raw)
    final = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["quantgate"]["degrade"]["path"] == ["active:truncated"]
    assert secs < 0.45 + MARGIN_S
    # an upstream that sends nothing: the fallback streams instead
    m = openai_manifest(upstream, model="hang")
    write(srv.manifest, m)
    srv.call(srv.gateway.reload_if_changed())   # now, or the watcher already did
    assert srv.gateway.rt.active.provider.model == "hang"

    async def again():
        async with aiohttp.ClientSession() as s:
            async with s.post(srv.url + "/v1/chat/completions",
                              json=oai_body("hi", stream=True, budget_ms=500)) as r:
                return r.headers["x-quantgate-deployment"], parse_sse(await r.read())

    dep, events = asyncio.run(again())
    assert dep == "fallback" and events[-1] == "[DONE]"


def test_ladder_trips_the_breaker_and_routes_to_the_fallback(serve):
    ladder = {"min_samples": 5, "window_s": 30, "eval_interval_s": 0.02, "breaker_cooldown_s": 60,
              "breaker": {"error_rate": 0.5}}
    m = base_manifest(ladder=ladder, cache={"enabled": False})
    m["active"] = mock("flaky", error_rate=1.0)
    srv = serve(m)

    async def main():
        async with aiohttp.ClientSession() as s:
            first = [await post(s, srv.url + "/chat", chat_body(f"p{i}")) for i in range(6)]
            await until(lambda: srv.gateway.ladder.level == 4, what="the breaker to open")
            after = await post(s, srv.url + "/chat", chat_body("after"))
            text = await (await s.get(srv.url + "/metrics")).text()
            return first, after, text

    first, after, text = asyncio.run(main())
    assert all(r[0] == 200 and r[1]["degrade"]["path"] == ["active:error", "fallback"] for r in first)
    status, body, _, _ = after
    assert status == 200 and body["degrade"]["path"] == ["fallback"]      # straight there, no failed try
    assert body["degrade"]["level"] == "breaker"
    assert body["degrade"]["notice"] == "switched to the stable fallback model"
    assert metric(text, "quantgate_degrade_level") == 4
    assert metric(text, "quantgate_degrade_transitions_total", from_level="normal", to_level="breaker") == 1


def test_the_breaker_recovers_on_its_own_once_the_active_deployment_is_healthy(serve, manifest_path):
    ladder = {"min_samples": 3, "window_s": 30, "eval_interval_s": 0.02, "breaker_cooldown_s": 0.2,
              "probe_successes": 2, "hold_s": 60, "breaker": {"error_rate": 0.5}}
    m = base_manifest(ladder=ladder, cache={"enabled": False})
    m["active"] = mock("flaky", error_rate=1.0)
    srv = serve(m)

    async def main():
        async with aiohttp.ClientSession() as s:
            for i in range(4):
                await post(s, srv.url + "/chat", chat_body(f"p{i}"))
            await until(lambda: srv.gateway.ladder.level == 4, what="the breaker to open")
            # the engine behind the same deployment is fixed (same name and version: the ladder stays)
            healed = base_manifest(ladder=ladder, cache={"enabled": False})
            healed["active"] = mock("flaky", error_rate=0.0)
            write(manifest_path, healed)
            await until(lambda: srv.gateway.rt.active.provider.error_rate == 0.0, what="the reload")
            await until(lambda: srv.gateway.ladder.half_open, what="the cool-down")
            answers = []
            while srv.gateway.ladder.level == 4 and len(answers) < 50:   # bounded
                answers.append(await post(s, srv.url + "/chat", chat_body(f"q{len(answers)}")))
            after = await post(s, srv.url + "/chat", chat_body("after"))
            return answers, after, await (await s.get(srv.url + "/metrics")).text()

    answers, after, text = asyncio.run(main())
    assert all(a[0] == 200 for a in answers)
    assert [a[1]["deployment"] for a in answers].count("flaky") == 2        # the two probes
    assert after[1]["deployment"] == "flaky" and after[1]["degrade"]["level"] == "heavy"   # steps down from there
    assert metric(text, "quantgate_degrade_transitions_total", from_level="breaker", to_level="heavy") == 1


def test_rollback_under_load_switches_deployments_with_no_failed_request(serve, manifest_path):
    m = base_manifest(max_concurrency=64, cache={"enabled": False})
    m["active"] = mock("candidate", "2", delay_ms=2, reply_tokens=4)
    srv = serve(m)
    rolled = base_manifest(max_concurrency=64, cache={"enabled": False})
    rolled["active"] = mock("baseline", "1", delay_ms=2, reply_tokens=4)
    rolled["history"] = [{"what": "rollback", "why": "p95 regression", "by": "test"}]
    results: list[tuple[int, str]] = []

    async def client(s, k, stop_after_baseline):
        n = 0
        for i in range(400):                 # bounded
            status, body, _, _ = await post(s, srv.url + "/chat", chat_body(f"c{k}-{i}"))
            results.append((status, body.get("deployment", body)))
            if body.get("deployment") == "baseline":
                n += 1
                if n >= stop_after_baseline:
                    return

    async def main():
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.ensure_future(client(s, k, 10)) for k in range(8)]
            await until(lambda: len(results) >= 40, what="traffic on the candidate")
            write(manifest_path, rolled)     # atomic rewrite, as `quantgate rollback` does
            await asyncio.gather(*tasks)
            return await (await s.get(srv.url + "/metrics")).text()

    text = asyncio.run(main())
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    deps = [d for _, d in results]
    assert deps[0] == "candidate" and "baseline" in deps
    first_baseline = deps.index("baseline")
    # once switched, at most the few requests already in flight (≤ 8 clients) still finish on the old one
    assert deps[first_baseline:].count("candidate") <= 8
    assert metric(text, "quantgate_manifest_reloads_total", result="ok") == 1
    assert metric(text, "quantgate_active_deployment", deployment="baseline") == 1
    assert metric(text, "quantgate_active_deployment", deployment="candidate") == 0


def test_in_flight_requests_finish_on_the_deployment_they_started_on(serve, manifest_path, upstream):
    # a real upstream connection, so retiring the old deployment too early would cut the request
    srv = serve(openai_manifest(upstream, model="slow-1500", cache={"enabled": False}))
    new = base_manifest(cache={"enabled": False})
    new["active"] = mock("promoted", "2")

    async def main():
        async with aiohttp.ClientSession() as s:
            before = upstream.stub.requests
            held = asyncio.ensure_future(post(s, srv.url + "/chat", chat_body("slow one", budget_ms=8000)))
            await until(lambda: upstream.stub.requests == before + 1, what="the request at the upstream")
            write(manifest_path, new)
            await until(lambda: srv.gateway.rt.active.name == "promoted", what="the reload")
            fresh = await post(s, srv.url + "/chat", chat_body("new one"))
            assert not held.done()
            return await held, fresh

    held, fresh = asyncio.run(main())
    assert held[0] == 200 and held[1]["deployment"] == "vllm-like" and held[1]["degrade"]["path"] == ["active"]
    assert fresh[0] == 200 and fresh[1]["deployment"] == "promoted"


def test_an_invalid_manifest_on_disk_keeps_the_old_one_serving(serve, manifest_path):
    srv = serve(base_manifest())
    manifest_path.write_text('{"active": {"name": "x", "provider": {"kind": "mock", "delay_ms": -1}}}')

    async def main():
        async with aiohttp.ClientSession() as s:
            await until(lambda: srv.gateway.last_reload_error is not None, what="the reload attempt")
            r = await post(s, srv.url + "/chat", chat_body())
            ready = await (await s.get(srv.url + "/readyz")).json()
            text = await (await s.get(srv.url + "/metrics")).text()
            return r, ready, text

    (status, body, _, _), ready, text = asyncio.run(main())
    assert status == 200 and body["deployment"] == "primary"
    assert "active.provider.delay_ms" in ready["reload_error"] and ready["status"] == "ready"
    assert metric(text, "quantgate_manifest_reloads_total", result="invalid") == 1
