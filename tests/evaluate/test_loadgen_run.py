"""The load generator end to end against a real streaming server on loopback, and its arrival
processes, mix and stop rules in virtual time."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
from pathlib import Path

import pytest

from loadgen_fakes import FakeOpenAI, InstantEngine, VirtualClock
from quantgate.errors import QuantgateError
from quantgate.evaluate.clients.openai_http import OpenAIClient
from quantgate.evaluate.loadgen import PromptSource, arrival_offsets, kind_sequence, run_load
from quantgate.workload import LengthClass, SLOSpec, WorkloadSpec

pytestmark = pytest.mark.timeout(60)

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank on a quiet morning."] * 3
ONE = [LengthClass(name="only", prompt_tokens=16, output_tokens=5)]
FOUR = [LengthClass(name="only", prompt_tokens=16, output_tokens=4)]


def wl(**kw) -> WorkloadSpec:
    base = dict(requests=4, concurrency=2, mix=ONE, warmup_requests=0, timeout_s=10)
    return WorkloadSpec(**{**base, **kw})


async def load(server: FakeOpenAI, workload: WorkloadSpec, url: str | None = None, **kw):
    async with server:
        async with OpenAIClient(url or server.url, "fake-model") as eng:
            return await run_load(eng, workload, TEXTS, **kw)


# ------------------------------------------------------------------- timing accuracy
def test_reports_the_injected_ttft_tpot_and_e2e():
    # The server streams the first token 50 ms after its handler starts and one more every
    # 20 ms (4 tokens), at absolute deadlines, so its own delays never pile up. Measured values
    # can only be *later* than injected ones: the client's clock starts before the request
    # leaves, and asyncio rounds sleeps up to the next millisecond; the -1 ms slack is clock
    # granularity only. How much later is scheduler jitter: idle, TTFT reads 52-55 ms here; on
    # a 2-core box shared with other test runs a P50 can slip by 10-20 ms. So: +15 ms for TTFT
    # and +20 ms for E2E at P50, and the whole measurement is retried (at most 3 times) when a
    # run lands outside; a systematic error fails every attempt: a TTFT taken at the empty role
    # chunk reads ~0 ms, one taken at the second token ~70 ms, and TPOT divided by 4 instead of
    # (4 - 1) reads 15 ms against the 20 ± 3 ms allowed.
    def within(a) -> bool:
        return (50 - 1 <= a.ttft.p50 <= 50 + 15 and 20 - 3 <= a.tpot.p50 <= 20 + 3
                and 110 - 1 <= a.e2e.p50 <= 110 + 20 and 20 - 5 <= a.itl.p50 <= 20 + 5)

    for _attempt in range(3):
        srv = FakeOpenAI(ttft=0.050, gap=0.020)
        rep = asyncio.run(load(srv, wl(requests=8, concurrency=4, warmup_requests=1, mix=FOUR)))
        a = rep.aggregates
        assert a.ok == 8, [r.error for r in rep.records]
        if within(a):
            break
    assert 50 - 1 <= a.ttft.p50 <= 50 + 15, a.ttft
    assert 20 - 3 <= a.tpot.p50 <= 20 + 3, a.tpot
    assert 110 - 1 <= a.e2e.p50 <= 110 + 20, a.e2e
    assert 20 - 5 <= a.itl.p50 <= 20 + 5, a.itl
    assert a.ttft.n == 8 and a.itl.n == 8 * 3 and a.itl.requests == 8
    for r in rep.records:
        assert r.tokens_out == 4 and len(r.itl_s) == 3
        assert r.ttft_s >= 0.050 - 0.001  # never before the server sent it
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 3)
    # the warm-up went first and is reported apart
    ids = [x.rsplit("-", 1)[-1] for x in srv.request_ids]  # X-Quantgate-Request: qg-<run tag>-<id>
    assert len(srv.bodies) == 9 and ids[0] == "w000000" and len(rep.warmup) == 1
    assert sorted(ids[1:]) == [r.id for r in rep.records]
    assert len({x.rsplit("-", 1)[0] for x in srv.request_ids}) == 1 and srv.request_ids[0].startswith("qg-")
    body = srv.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and body["ignore_eos"] is True and body["model"] == "fake-model"


def test_usage_counts_win_over_chunk_counts():
    # 3 tokens per SSE chunk: 12 tokens arrive in 4 chunks; usage says 12 and 17 prompt tokens
    srv = FakeOpenAI(tokens_per_chunk=3, prompt_tokens=17)
    mix = [LengthClass(name="only", prompt_tokens=16, output_tokens=12)]
    rep = asyncio.run(load(srv, wl(requests=2, mix=mix)))
    for r in rep.records:
        assert r.outcome == "ok" and r.tokens_out == 12 and r.tokens_in == 17 and len(r.itl_s) == 3
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 11)


def test_without_usage_tokens_are_counted_from_chunks():
    srv = FakeOpenAI(usage=False)
    rep = asyncio.run(load(srv, wl(requests=2)))
    sent = {x.rsplit("-", 1)[-1]: b for x, b in zip(srv.request_ids, srv.bodies)}
    for r in rep.records:
        assert r.outcome == "ok" and r.tokens_out == 5
        # no usage: the prompt's size is the generator's own ~4 chars/token estimate
        assert r.tokens_in == PromptSource(TEXTS).estimate_tokens(sent[r.id]["messages"][0]["content"])


@pytest.mark.parametrize("mode", ["nodone", "json"])
def test_streams_without_done_and_unstreamed_replies_still_count(mode):
    rep = asyncio.run(load(FakeOpenAI(mode=mode), wl(requests=2)))
    assert [r.outcome for r in rep.records] == ["ok", "ok"], [r.error for r in rep.records]
    assert all(r.tokens_out == 5 and r.tokens_in == 17 for r in rep.records)


# ------------------------------------------------------------------------- failures
def test_an_error_event_mid_stream_is_an_error_outcome():
    rep = asyncio.run(load(FakeOpenAI(mode="midstream_error"), wl(requests=2)))
    assert [r.outcome for r in rep.records] == ["error", "error"]
    assert "CUDA out of memory" in rep.records[0].error and rep.aggregates.ttft.n == 0


def test_stalled_server_gives_timeout_outcomes():
    srv = FakeOpenAI(mode="stall")
    rep = asyncio.run(load(srv, wl(requests=3, concurrency=3, timeout_s=0.3)))
    assert [r.outcome for r in rep.records] == ["timeout"] * 3
    assert "0.3 s" in rep.records[0].error
    assert rep.aggregates.timeout_rate == 1.0 and rep.aggregates.ttft.n == 0
    assert rep.wall_s < 5


def test_http_500_gives_error_outcomes_with_the_servers_message():
    rep = asyncio.run(load(FakeOpenAI(mode="500"), wl(requests=2)))
    assert [r.outcome for r in rep.records] == ["error", "error"]
    assert "HTTP 500" in rep.records[0].error and "boom: model crashed" in rep.records[0].error
    assert rep.aggregates.error_rate == 1.0 and rep.aggregates.goodput == 0.0


def test_connection_refused_gives_error_outcomes():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rep = asyncio.run(load(FakeOpenAI(), wl(requests=2), url=f"http://127.0.0.1:{port}"))
    assert [r.outcome for r in rep.records] == ["error", "error"]
    assert "cannot reach" in rep.records[0].error and str(port) in rep.records[0].error


def test_an_engine_that_was_not_started_is_an_error_not_a_crash():
    rep = asyncio.run(run_load(OpenAIClient("http://127.0.0.1:9", "m"), wl(requests=1), TEXTS))
    assert rep.records[0].outcome == "error" and "start()" in rep.records[0].error


# ------------------------------------------------------------------------ concurrency
def test_fixed_concurrency_never_exceeds_the_cap():
    srv = FakeOpenAI(ttft=0.02, gap=0.002)
    rep = asyncio.run(load(srv, wl(requests=12, concurrency=3)))
    assert rep.aggregates.ok == 12
    assert srv.max_in_flight == 3  # reached, never exceeded
    # the generator's own view agrees: at no send time were more than 3 requests open
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in rep.records]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 3


def test_rate_arrivals_are_capped_too():
    srv = FakeOpenAI(ttft=0.02)
    rep = asyncio.run(load(srv, wl(requests=10, concurrency=2, arrival="poisson", rate=1000.0)))
    assert rep.aggregates.ok == 10 and srv.max_in_flight <= 2


# ------------------------------------------------------- arrivals, mix, stop (virtual time)
@pytest.mark.parametrize("arrival,shape", [("poisson", 1.0), ("burst", 0.25)])
def test_arrival_schedule_is_seeded_and_has_the_asked_mean_rate(arrival, shape):
    spec = wl(arrival=arrival, rate=50.0, burstiness=shape, seed=3)
    offs = arrival_offsets(spec, 20001)
    assert offs == arrival_offsets(spec, 20001) and offs[0] == 0.0
    assert offs != arrival_offsets(spec.model_copy(update={"seed": 4}), 20001)
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 50.0, rel=0.05)
    # coefficient of variation of gamma gaps is 1/sqrt(shape): 1 for poisson, 2 for shape 0.25
    assert statistics.pstdev(gaps) / mean == pytest.approx(shape ** -0.5, rel=0.1)


@pytest.mark.parametrize("arrival,shape", [("poisson", 1.0), ("burst", 0.3)])
def test_requests_are_sent_at_the_scheduled_offsets(arrival, shape):
    spec = wl(requests=40, concurrency=64, arrival=arrival, rate=20.0, burstiness=shape, seed=7)

    async def once():
        clock = VirtualClock()
        return await run_load(InstantEngine(), spec, TEXTS, clock=clock, sleep=clock.sleep)

    a, b = asyncio.run(once()), asyncio.run(once())
    want = arrival_offsets(spec, 40)
    assert [r.start_s for r in a.records] == pytest.approx(want, abs=1e-9)
    assert [r.start_s for r in b.records] == [r.start_s for r in a.records]
    assert a.wall_s == pytest.approx(want[-1])
    assert 40 / a.wall_s == pytest.approx(20.0, rel=0.5)  # one short run: only roughly the mean rate


def test_real_time_sends_follow_the_schedule():
    # real clock, in-process engine: a send can be late (never early) by the event loop's delay
    spec = wl(requests=60, concurrency=64, arrival="poisson", rate=300.0, seed=1)
    rep = asyncio.run(run_load(InstantEngine(), spec, TEXTS))
    late = [r.start_s - want for r, want in zip(rep.records, arrival_offsets(spec, 60))]
    assert min(late) >= -1e-4
    assert statistics.median(late) < 0.010
    span = rep.records[-1].start_s - rep.records[0].start_s
    assert 59 / span == pytest.approx(59 / arrival_offsets(spec, 60)[-1], rel=0.3)


def test_mix_is_drawn_by_weight_from_the_seed():
    mix = [LengthClass(name="short", weight=0.7, prompt_tokens=8, output_tokens=2),
           LengthClass(name="long", weight=0.3, prompt_tokens=64, output_tokens=6)]
    seq = kind_sequence(mix, seed=5)
    names = [next(seq).name for _ in range(20000)]
    assert names.count("short") / len(names) == pytest.approx(0.7, abs=0.001)
    # allocated, not drawn: a short test still gets its long requests (12 of 70/30: 3 or 4)
    assert names[:10].count("long") == 3 and names[:12].count("long") in (3, 4)
    odd = kind_sequence([mix[0], mix[1].model_copy(update={"weight": 0.05})], seed=1)
    first = [next(odd).name for _ in range(40)]
    assert first.count("long") in (2, 3)
    again = kind_sequence(mix, seed=5)
    assert [next(again).name for _ in range(200)] == names[:200]
    other = kind_sequence(mix, seed=6)
    assert [next(other).name for _ in range(200)] != names[:200]

    eng = InstantEngine()
    rep = asyncio.run(run_load(eng, wl(requests=50, concurrency=4, mix=mix, seed=5, warmup_requests=3), TEXTS))
    assert [r.kind for r in rep.records] == names[:50]  # the warm-up does not shift the sequence
    assert all(r.tokens_out == (2 if r.kind == "short" else 6) for r in rep.records)
    assert set(rep.aggregates.per_kind) == {"short", "long"}
    long_prompt = next(q for q in eng.seen if q.kind == "long").messages[0]["content"]
    assert 0.75 * 64 * 4 <= len(long_prompt) <= 1.25 * 64 * 4  # ~4 chars per token


def test_duration_stops_sending_and_waits_for_in_flight():
    clock = VirtualClock()
    spec = wl(requests=None, duration_s=1.0, concurrency=2)
    rep = asyncio.run(run_load(InstantEngine(clock, cost_s=0.1), spec, TEXTS, clock=clock, sleep=clock.sleep))
    # each request costs 0.1 virtual s and two workers share the clock: no send at or after 1 s
    assert 9 <= len(rep.records) <= 11 and all(r.start_s < 1.0 for r in rep.records)
    assert rep.aggregates.ok == len(rep.records)
    seen = []
    asyncio.run(run_load(InstantEngine(), wl(requests=7), TEXTS, progress=lambda d, t: seen.append((d, t))))
    assert seen[-1] == (7, 7) and len(seen) == 7


def test_report_round_trips_through_json():
    spec = wl(requests=3, slo=SLOSpec(ttft_ms=1000))
    rep = asyncio.run(run_load(InstantEngine(), spec, TEXTS))
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["workload"] == spec.model_dump(mode="json") and len(d["records"]) == 3
    assert d["aggregates"]["slo_attainment"] == 1.0 and d["engine"] == "instant"


# ---------------------------------------------------------------------------- prompts
def test_prompt_source_sizes_and_varies_prompts():
    words = [f"w{i}" for i in range(500)]
    src = PromptSource([" ".join(words)], count_tokens=lambda t: len(t.split()))
    assert len(src.prompt(40, 0).split()) == 40 and len(src.prompt(1, 3).split()) == 1
    assert src.prompt(40, 0) != src.prompt(40, 1)
    assert src.prompt(40, 2) == src.prompt(40, 2)
    tiny = PromptSource(["just four words here"])
    assert len(tiny.prompt(100)) >= 400  # a short pool is cycled
    with pytest.raises(QuantgateError, match="no prompt text"):
        PromptSource(["", "   "])


def test_prompt_jsonl_errors_name_file_and_line(tmp_path: Path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello there"}\n\n{"prompt": "general kenobi"}\n')
    assert "hello" in PromptSource.from_jsonl(good).prompt(50)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(QuantgateError, match=r"bad\.jsonl:3: not valid JSON"):
        PromptSource.from_jsonl(bad)
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(QuantgateError, match=r"bad\.jsonl:2: .*'prompt' \(got: text\)"):
        PromptSource.from_jsonl(bad)
    with pytest.raises(QuantgateError, match="does not exist"):
        PromptSource.from_jsonl(tmp_path / "missing.jsonl")
