"""Security, the command provider (issue 10, findings 9, 10): prompts cannot become options, NUL
bytes and oversized prompts are the client's 400 (not an upstream failure), a timeout kills the
whole process group, and the CLI's stderr never reaches the client."""

from __future__ import annotations

import os
import sys

import httpx
from gwkit import base_manifest, chat_body, until

from quantgate.serve.providers.command import MAX_ARG_BYTES, prompt_problem

ECHO = "import sys; print(sys.argv[-1].upper())"


def solo(argv: list[str], **provider) -> dict:
    m = base_manifest(max_input_tokens=200_000, max_message_chars=1_000_000)
    del m["serving"]["fallback"]
    m["active"] = {"name": "cli", "provider": {"kind": "command", "argv": argv, **provider}}
    return m


def test_prompt_rules_are_pure():
    argv = ["cli", "-p", "{prompt}"]
    assert prompt_problem(argv, False, "hello") is None
    assert "option" in prompt_problem(argv, False, "--help")
    assert prompt_problem(["cli", "--", "{prompt}"], False, "--help") is None
    assert prompt_problem(["cli", "--prompt={prompt}"], False, "--help") is None
    assert "NUL" in prompt_problem(argv, False, "a\x00b") and "NUL" in prompt_problem(argv, True, "a\x00b")
    assert "stdin" in prompt_problem(argv, False, "x" * (MAX_ARG_BYTES + 1))
    assert prompt_problem(argv, True, "x" * (MAX_ARG_BYTES + 1)) is None


def test_a_prompt_starting_with_a_dash_is_not_an_option(serve):
    srv = serve(solo([sys.executable, "-c", ECHO, "{prompt}"]))
    r = httpx.post(srv.url + "/chat", json=chat_body("--version"), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert len(srv.gateway.ladder.samples) == 0  # not the upstream's fault


def test_with_a_double_dash_the_prompt_is_passed_literally(serve):
    srv = serve(solo([sys.executable, "-c", "import sys; print(sys.argv[-1].upper())", "--", "{prompt}"]))
    r = httpx.post(srv.url + "/chat", json=chat_body("--version"), timeout=10)
    assert r.status_code == 200 and r.json()["text"] == "--VERSION"


def test_nul_and_oversized_prompts_are_400_not_502(serve):
    srv = serve(solo([sys.executable, "-c", ECHO, "{prompt}"]))
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.post("/chat", json=chat_body("a\x00b")).status_code == 400
        r = c.post("/chat", json=chat_body("y" * (MAX_ARG_BYTES + 10)))
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert len(srv.gateway.ladder.samples) == 0


def test_stdin_carries_a_large_prompt(serve):
    srv = serve(solo([sys.executable, "-c", "import sys; print(len(sys.stdin.read()))"], stdin=True))
    r = httpx.post(srv.url + "/chat", json=chat_body("z" * (MAX_ARG_BYTES + 10)), timeout=10)
    assert r.status_code == 200 and r.json()["text"] == str(MAX_ARG_BYTES + 10)


def test_a_timeout_kills_the_grandchildren_too(serve, tmp_path):
    """Finding 9: only the direct child was killed; the grandchild kept the pipes and the request waited."""
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    srv = serve(solo([sys.executable, "-c", code, "--", "{prompt}"], timeout_s=1))
    r = httpx.post(srv.url + "/chat", json=chat_body("hang", budget_ms=9000), timeout=30)
    assert r.status_code == 502
    pid = int(pidfile.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie that nobody reaped yet is dead as well
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    async def wait_gone():
        await until(gone, 10, "the grandchild killed")
    srv.call(wait_gone())


def test_stderr_stays_in_the_log(serve, caplog):
    """Finding 10: a CLI's stderr (a key-like string, a home path) was sent to the client."""
    code = "import sys; sys.stderr.write('token sk-live-123 in /home/alice/.config'); sys.exit(3)"
    srv = serve(solo([sys.executable, "-c", code, "--", "{prompt}"]))
    r = httpx.post(srv.url + "/chat", json=chat_body("hi"), timeout=10)
    assert r.status_code == 502 and "sk-live" not in r.text and "/home/alice" not in r.text
    assert r.json()["trace_id"] in r.json()["error"]["message"]
    assert any("sk-live-123" in rec.getMessage() for rec in caplog.records)  # the operator still sees it
