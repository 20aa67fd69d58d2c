"""Providers on their own (mock determinism, the local transformers provider) and the Redis cache."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from gwkit import base_manifest, chat_body, metric, oai_body, parse_sse

from quantgate.serve.manifest import Deployment
from quantgate.serve.providers import GenRequest, ProviderError, StreamStats, make_provider


def _mock(**engine):
    d = Deployment.model_validate({"name": "m", "provider": {"kind": "mock", "delay_ms": 0, **engine}})
    return make_provider(d)


def test_mock_is_deterministic_and_streams_what_it_generates():
    async def main():
        a, b = _mock(seed=3, reply_tokens=6), _mock(seed=3, reply_tokens=6)
        req = GenRequest([{"role": "user", "content": "same prompt"}], max_tokens=4)
        ra, rb = await a.generate(req), await b.generate(req)
        assert ra.text == rb.text and ra.tokens_out == 4 and ra.finish_reason == "length"
        other = await a.generate(GenRequest([{"role": "user", "content": "other prompt"}], max_tokens=4))
        assert other.text != ra.text
        stats = StreamStats()
        pieces = [p async for p in b.stream(req, stats)]
        assert "".join(pieces) == ra.text and stats.tokens_out == 4

    asyncio.run(main())


def test_mock_error_rate_follows_its_seed():
    async def outcomes(seed):
        p, out = _mock(seed=seed, error_rate=0.5), []
        for i in range(40):
            try:
                await p.generate(GenRequest([{"role": "user", "content": str(i)}], max_tokens=2))
                out.append(True)
            except ProviderError:
                out.append(False)
        return out

    first, again = asyncio.run(outcomes(7)), asyncio.run(outcomes(7))
    assert first == again and 5 < first.count(False) < 35
    assert asyncio.run(outcomes(8)) != first


def test_local_provider_serves_a_real_checkpoint(serve, tiny_model):
    m = base_manifest(cache={"enabled": False})
    m["active"] = {"name": "tiny-local", "artifact": str(tiny_model), "method": "baseline",
                   "provider": {"kind": "local", "device": "cpu", "max_new_tokens": 6},
                   "evaluated": {"dtype": "bfloat16"}}  # a hand-edited manifest: auto loads the saved float32
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        said = c.get("/readyz").json()["active_ready"]
        assert said == (f"{tiny_model} on cpu in float32 (dense); NOT the gated arithmetic: "
                        "dtype float32 is served, the gates were measured in bfloat16")
        a = c.post("/chat", json=chat_body("The quick brown fox", max_tokens=4, budget_ms=10000)).json()
        assert a["deployment"] == "tiny-local" and a["degrade"]["path"] == ["active"], a
        assert 1 <= a["tokens"]["out"] <= 4 and a["tokens"]["in"] > 1
        r = c.post("/v1/chat/completions", json=oai_body("To be, or not", stream=True, max_tokens=3, budget_ms=10000))
        events = parse_sse(r.content)
        assert events[-1] == "[DONE]" and r.headers["x-quantgate-deployment"] == "tiny-local"
        final = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]][0]
        assert final["quantgate"]["tokens"]["out"] <= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_cache_is_shared_between_two_gateways(tmp_path, manifest_path):
    pytest.importorskip("redis")
    from gwkit import write

    from quantgate.serve.server import ServerThread

    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:   # wait for redis to accept connections (bounded)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        write(manifest_path, base_manifest(cache={"backend": "redis", "url": f"redis://127.0.0.1:{port}/0"}))
        with ServerThread(manifest_path) as a, ServerThread(manifest_path) as b:
            first = httpx.post(a.url + "/chat", json=chat_body("shared")).json()
            assert first["cached"] is False
            # the write to redis happens just after the answer; poll the second replica briefly
            for _ in range(200):
                second = httpx.post(b.url + "/chat", json=chat_body("shared")).json()
                if second["cached"]:
                    break
            assert second["cached"] is True and second["text"] == first["text"]
            assert metric(httpx.get(b.url + "/metrics").text, "quantgate_cache_hits_total") >= 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_serve_command_starts_serves_and_stops(tmp_path):
    """`quantgate serve` as a person runs it: a real process, a real port, Ctrl-C to stop."""
    from gwkit import write

    manifest = write(tmp_path / "manifest.json", base_manifest())
    port = _free_port()
    code = ("import typer, sys; from quantgate.serve.cli import register; a = typer.Typer(); "
            "a.callback()(lambda: None); register(a); a()")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(manifest), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"quantgate gateway on http://127.0.0.1:{port}" in line, line
        r = httpx.post(f"http://127.0.0.1:{port}/chat", json=chat_body(), headers={"x-trace-id": "cli-1"})
        assert r.status_code == 200 and r.json()["trace_id"] == "cli-1"
    finally:
        proc.send_signal(2)
        assert proc.wait(20) == 0


def test_the_serve_command_refuses_a_bad_manifest(tmp_path):
    import typer
    from typer.testing import CliRunner

    from quantgate.serve.cli import register
    from quantgate.serve.manifest import ManifestError

    bad = tmp_path / "manifest.json"
    bad.write_text('{"active": {"name": "x", "provider": {"kind": "openai", "model": "m"}}}')
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    result = CliRunner().invoke(app, ["serve", str(bad)])
    assert result.exit_code != 0 and isinstance(result.exception, ManifestError)
    assert f"{bad}:1: active.provider.base_url: Field required" in str(result.exception)


def test_a_local_deployment_counts_the_prompt_with_its_own_tokenizer(serve, tiny_model):
    """The engine's context (max_model_len less max_tokens) is checked with the deployment's tokenizer,
    not the four-characters-a-token estimate: a prompt the estimate lets through but the model cannot
    hold is the client's 413 before admission."""
    from transformers import AutoTokenizer

    from quantgate.serve.providers.base import GenRequest
    from quantgate.serve.providers.local import LocalProvider

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cap = 64 - 8

    def exact(prompt):
        return len(tok(LocalProvider._text(tok, GenRequest([{"role": "user", "content": prompt}], 1)))["input_ids"])

    # a prompt whose estimate fits the cap while its real token count does not
    prompt = next(p for p in ("a " * k for k in range(10, 400)) if exact(p) > cap)
    assert len(prompt) // 4 < cap, "the tiny tokenizer should spend more than one token per four characters here"
    m = base_manifest(cache={"enabled": False})
    m["active"] = {"name": "tiny-local", "artifact": str(tiny_model), "max_tokens": 8,
                   "engine": {"kind": "transformers", "max_model_len": 64},
                   "provider": {"kind": "local", "device": "cpu", "max_new_tokens": 4}}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/chat", json=chat_body(prompt, max_tokens=2, budget_ms=10000))
        assert r.status_code == 413, r.text
        msg = r.json()["error"]["message"]
        assert f"{exact(prompt)} tokens (its tokenizer)" in msg and "max_model_len=64" in msg
        ok = c.post("/chat", json=chat_body("a b", max_tokens=2, budget_ms=10000))
        assert ok.status_code == 200 and ok.json()["tokens"]["in"] == exact("a b")
