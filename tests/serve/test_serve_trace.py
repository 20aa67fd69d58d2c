"""The gateway's traffic trace (serving.trace) and its replay by the load generator."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from gwkit import base_manifest, chat_body, mock, write
from quantgate.evaluate.clients.openai_http import OpenAIClient
from quantgate.evaluate.loadgen import run_load
from quantgate.serve.manifest import TraceSpec
from quantgate.serve.server import ServerThread
from quantgate.serve.trace import (TraceWriter, _File, event, line, needs_rotation, outcome_of, rotation_moves,
                                   tenant_hash)
from quantgate.workload import LengthClass, WorkloadSpec, chain_segments, read_trace, trace_files

pytestmark = pytest.mark.timeout(120)

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank on a quiet morning."] * 3
MIX = [LengthClass(name="a", prompt_tokens=10, output_tokens=5, weight=1),
       LengthClass(name="b", prompt_tokens=37, output_tokens=12, weight=1),
       LengthClass(name="c", prompt_tokens=90, output_tokens=30, weight=1)]


def traced(path: Path, **trace) -> dict:
    m = base_manifest(trace={"path": str(path), **trace})
    m["active"] = mock("primary", reply_tokens=64)
    return m


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ pure part
def test_outcome_labels():
    assert outcome_of(None) == "ok"
    assert outcome_of(None, cached=True) == "cached"
    assert outcome_of(None, degraded=True) == "degraded"
    assert outcome_of(429, error_type="rate_limited", limit="rpm") == "429:rpm"
    assert outcome_of(400, error_type="invalid_request_error") == "4xx:invalid_request_error"
    assert outcome_of(504, error_type="budget_exhausted") == "5xx:budget_exhausted"
    assert outcome_of(None, closed=True) == "client_closed"


def test_tenant_hash_is_keyed_by_the_file_salt():
    a, b = b"1" * 16, b"2" * 16
    assert tenant_hash(a, "acme") == tenant_hash(a, "acme") != tenant_hash(b, "acme")
    assert "acme" not in tenant_hash(a, "acme")
    assert tenant_hash(a, None) is None


def test_a_line_has_no_text_unless_asked():
    ev = event(100.5, "acme", "openai", True, "ok", tokens_in=7, tokens_out=3, max_tokens=3, budget_ms=900,
               level="normal", path=["active"], prompt="SECRET PROMPT", answer="SECRET ANSWER")
    plain = line(ev, 100.0, b"s" * 16, include_text=False)
    assert "SECRET" not in plain and "acme" not in plain
    rec = json.loads(plain)
    assert rec["t"] == 0.5 and rec["prompt_tokens"] == 7 and rec["output_tokens"] == 3 and rec["stream"] is True
    assert "SECRET PROMPT" in line(ev, 100.0, b"s" * 16, include_text=True)


def test_rotation_decision_and_moves(tmp_path):
    assert not needs_rotation(0, 10_000, 4096)  # an empty file takes one line whatever its size
    assert needs_rotation(4000, 200, 4096) and not needs_rotation(3000, 200, 4096)
    f = tmp_path / "t.jsonl"
    assert rotation_moves(f, 2) == [(tmp_path / "t.jsonl.2", None), (tmp_path / "t.jsonl.1", tmp_path / "t.jsonl.2"),
                                    (f, tmp_path / "t.jsonl.1")]
    assert rotation_moves(f, 0) == [(f, None)]


@pytest.mark.parametrize("keep", [0, 2])
def test_rotation_keeps_at_most_keep_files_each_within_max_bytes(tmp_path, keep):
    f = _File(TraceSpec(path=str(tmp_path / "t.jsonl"), max_bytes=4096, keep=keep))
    evs = [event(1000.0 + i, f"tenant{i % 3}", "chat", False, "ok", tokens_in=i, tokens_out=1, max_tokens=1,
                 budget_ms=1000) for i in range(400)]
    for i in range(0, 400, 7):
        f.write(evs[i:i + 7])
    f.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl"] + [f"t.jsonl.{i}" for i in range(1, keep + 1)]
    for name in files:
        p = tmp_path / name
        assert p.stat().st_size <= 4096
        first = json.loads(p.read_text().splitlines()[0])
        assert "quantgate_trace" in first and "started" in first  # every file has its own header (and salt)
    # the newest file ends with the last request, and the times count from that file's first request
    last = lines(tmp_path / "t.jsonl")
    assert last[-1]["prompt_tokens"] == 399 and last[1]["t"] == 0.0


def test_a_rotated_trace_replays_from_its_oldest_file_on_without_the_gaps_between_files(tmp_path):
    spec = TraceSpec(path=str(tmp_path / "t.jsonl"), max_bytes=8192, keep=10)  # room for every request
    # one request a second; after request 199 the gateway stops, and one started an hour later goes on
    evs = [event(1000.0 + i + (3600 if i >= 200 else 0), "t", "chat", False, "ok", tokens_in=i, tokens_out=1,
                 max_tokens=1, budget_ms=1000) for i in range(240)]
    for part in (evs[:200], evs[200:]):
        f = _File(spec)
        for i in range(0, len(part), 7):
            f.write(part[i:i + 7])
        f.close()
    files = trace_files(tmp_path / "t.jsonl")
    assert [p.name for p in files][-2:] == ["t.jsonl.1", "t.jsonl"] and len(files) > 2
    recs = read_trace(tmp_path / "t.jsonl")
    assert [r["prompt_tokens"] for r in recs] == list(range(240))   # every file, oldest first, no gap lost
    steps = [b["t"] - a["t"] for a, b in zip(recs, recs[1:])]
    assert max(steps) <= 1.0 + 1e-6 and min(steps) >= 0          # neither the hour nor a rotation replayed
    assert len(read_trace(files[0])) < 240                         # a rotated file named alone: just it


def test_chaining_files_continues_each_from_the_last_arrival():
    a = [{"t": 0.0, "n": 1}, {"t": 2.0, "n": 2}]
    b = [{"t": 0.0, "n": 3}, {"t": 0.5, "n": 4}]
    assert [(r["t"], r["n"]) for r in chain_segments([a, [], b])] == [(0.0, 1), (2.0, 2), (2.0, 3), (2.5, 4)]


def test_a_full_buffer_drops_and_counts(tmp_path):
    dropped = []
    w = TraceWriter(TraceSpec(path=str(tmp_path / "t.jsonl")), dropped.append, capacity=2)
    for i in range(5):
        w.add(event(float(i), None, "chat", False, "ok", tokens_in=1, tokens_out=1, max_tokens=1, budget_ms=1))
    assert w.dropped == 3 and sum(dropped) == 3 and len(w.buf) == 2


def test_read_trace_names_the_bad_line(tmp_path):
    from quantgate.errors import QuantgateError

    p = tmp_path / "t.jsonl"
    p.write_text('{"quantgate_trace": 1}\n{"t": 0, "prompt_tokens": 3, "output_tokens": 2}\nnot json\n')
    with pytest.raises(QuantgateError, match="line 3"):
        read_trace(p)


def test_a_workload_without_trace_dumps_as_before():
    d = WorkloadSpec().model_dump()
    assert "trace" not in d and "time_scale" not in d
    assert WorkloadSpec(trace="x.jsonl", time_scale=0.5).model_dump()["time_scale"] == 0.5


# ------------------------------------------------------------------------------ the gateway
def test_the_gateway_writes_counts_but_no_text_or_tenant(serve, tmp_path):
    path = tmp_path / "trace.jsonl"
    srv = serve(traced(path))

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{srv.url}/chat", json=chat_body("SECRET-PROMPT-7781", max_tokens=6),
                              headers={"x-tenant": "acme-corp"}) as r:
                assert r.status == 200
                answer = (await r.json())["text"]
            async with s.post(f"{srv.url}/chat", json=chat_body("x", max_tokens=999999)) as r:
                assert r.status == 400
        return answer

    answer = asyncio.run(go())
    srv.call(srv.gateway.trace.flush())
    text = path.read_text()
    assert "SECRET-PROMPT-7781" not in text and answer not in text and "acme-corp" not in text
    head, ok, bad = lines(path)
    assert "started" in head
    assert ok["outcome"] == "ok" and ok["route"] == "chat" and ok["output_tokens"] == 6 and ok["max_tokens"] == 6
    assert ok["tenant"] and ok["degrade"]["level"] == "normal"
    assert bad["outcome"] == "4xx:invalid_request_error" and bad["output_tokens"] == 0


def test_include_text_writes_the_prompt(serve, tmp_path):
    path = tmp_path / "trace.jsonl"
    srv = serve(traced(path, include_text=True))

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{srv.url}/chat", json=chat_body("VISIBLE-PROMPT-1")) as r:
                assert r.status == 200

    asyncio.run(go())
    srv.call(srv.gateway.trace.flush())
    assert lines(path)[1]["prompt"] == "VISIBLE-PROMPT-1"


def test_without_trace_the_gateway_has_no_writer(serve):
    assert serve(base_manifest()).gateway.trace is None


# ------------------------------------------------------------------------------ record → replay
async def _load(url: str, workload: WorkloadSpec):
    async with OpenAIClient(url, "primary") as eng:
        return await run_load(eng, workload, TEXTS)


def test_a_recorded_trace_replays_with_the_same_requests_and_token_lengths(serve, tmp_path):
    a, b = tmp_path / "a" / "trace.jsonl", tmp_path / "b" / "trace.jsonl"
    srv = serve(traced(a))
    recorded = asyncio.run(_load(srv.url, WorkloadSpec(requests=24, concurrency=4, mix=MIX, warmup_requests=1,
                                                       timeout_s=20)))
    assert recorded.aggregates.ok == 24
    srv.call(srv.gateway.trace.flush())
    first = read_trace(a)
    assert len(first) == 25  # the warm-up was served too

    m = tmp_path / "b" / "manifest.json"
    m.parent.mkdir()
    second = ServerThread(write(m, traced(b))).start()
    try:
        replay = asyncio.run(_load(second.url, WorkloadSpec(trace=str(a), time_scale=0, concurrency=8,
                                                            warmup_requests=0, timeout_s=20)))
        second.call(second.gateway.trace.flush())
    finally:
        second.stop()
    again = read_trace(b)

    def shape(recs):
        return Counter((r["prompt_tokens"], r["output_tokens"]) for r in recs)

    assert replay.aggregates.total == len(first) == len(again)
    assert replay.aggregates.ok == len(first)
    assert shape(again) == shape(first)
    assert {o for _, o in shape(first)} == {5, 12, 30}  # every kind of request really went through
    # what the load generator sent and got back has the same shape too
    assert Counter((r.tokens_in, r.tokens_out) for r in replay.records) == shape(first)
    assert {(x["stream"], x["route"]) for x in lines(b)[1:]} == {(True, "openai")}
    assert {x["outcome"] for x in lines(b)[1:]} <= {"ok", "cached"}  # a repeated prompt may hit the cache
