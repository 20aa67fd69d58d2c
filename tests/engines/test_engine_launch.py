"""The generic launcher against a real (tiny, local) OpenAI-compatible server process: readiness,
memory, clean stop, SIGKILL after the grace period, and failed starts in the engine's own words."""

from __future__ import annotations

import os

import pytest

from quantgate.procs import (
    EngineStartError,
    ServerProcess,
    free_port,
    http_ok,
    tail_of,
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it is dead for our purposes
    return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"


def test_start_answers_then_stops_with_sigterm(fake_cmd, tmp_path):
    port = free_port()
    srv = ServerProcess("fake", fake_cmd(port, "--spawn-child"), port=port, log_path=tmp_path / "fake.log",
                        startup_timeout_s=30)
    with srv:
        rec = srv.record
        assert rec.ready and rec.startup_s > 0 and srv.alive()
        assert http_ok(f"{srv.base_url}/v1/models") and rec.metrics_endpoint is True
        pid = rec.pid
    assert rec.stopped_by == "sigterm" and rec.shutdown_s is not None
    assert rec.peak_rss_mb and rec.peak_rss_mb > 10 and rec.processes >= 2  # the server and its child
    assert _gone(pid) and not http_ok(f"http://127.0.0.1:{port}/v1/models", 0.5)
    assert any("listening on" in x for x in rec.log_tail)
    srv.stop()  # idempotent


def test_a_server_ignoring_sigterm_is_killed_after_the_grace_period(fake_cmd, tmp_path):
    port = free_port()
    srv = ServerProcess("stubborn", fake_cmd(port, "--ignore-term"), port=port, log_path=tmp_path / "s.log",
                        startup_timeout_s=30, grace_s=1.0)
    srv.start()
    rec = srv.stop()
    assert rec.stopped_by == "sigkill" and _gone(rec.pid)


def test_failed_start_reports_the_engines_last_log_lines(fake_cmd, tmp_path):
    port = free_port()
    srv = ServerProcess("broken", fake_cmd(port, "--fail", "ValueError: Unsupported quantization config: bits=3"),
                        port=port, log_path=tmp_path / "b.log", startup_timeout_s=30)
    with pytest.raises(EngineStartError) as ei:
        srv.start()
    msg = str(ei.value)
    assert "exited with code 1" in msg and "ValueError: Unsupported quantization config: bits=3" in msg
    assert "last log lines" in msg and str(tmp_path / "b.log") in msg
    rec = ei.value.record
    assert rec.exit_code == 1 and not rec.ready and rec.stopped_by == "exited"
    assert rec.log_tail[-2] == "ValueError: Unsupported quantization config: bits=3"


def test_never_ready_is_stopped_at_the_deadline(fake_cmd, tmp_path):
    port = free_port()
    srv = ServerProcess("slow", fake_cmd(port, "--never-ready"), port=port, log_path=tmp_path / "n.log",
                        startup_timeout_s=1.5, poll_s=0.1, grace_s=2)
    with pytest.raises(EngineStartError, match="did not answer .* within 1.5 s") as ei:
        srv.start()
    assert _gone(ei.value.record.pid) and ei.value.record.stopped_by in ("sigterm", "sigkill")


def test_missing_binary_is_a_clear_error(tmp_path):
    from quantgate.procs import Command

    srv = ServerProcess("none", Command([str(tmp_path / "no-such-python"), "-m", "x"], {}), port=free_port(),
                        log_path=tmp_path / "x.log")
    with pytest.raises(EngineStartError, match="cannot start .*no-such-python"):
        srv.start()


def test_tail_of_reads_the_last_lines(tmp_path):
    p = tmp_path / "l.log"
    p.write_text("".join(f"line {i}\n" for i in range(100)) + "progress 10%\rprogress 100%\n")
    assert tail_of(p, 3) == ["line 99", "progress 10%", "progress 100%"]
    assert tail_of(tmp_path / "missing.log") == []


def test_an_already_running_server_is_measured_without_a_launch(fake_cmd, tmp_path):
    from quantgate.engines.card import deployment_of
    from quantgate.formats import Artifact
    from quantgate.engines.pairs import run_pair
    from quantgate.engines.spec import EngineSelectionSpec, EngineSpec, SweepSpec
    from quantgate.evaluate.loadgen import PromptSource
    from quantgate.workload import LengthClass, WorkloadSpec
    from quantgate.workspace import RunFolder

    port = free_port()
    with ServerProcess("sglang-stand-in", fake_cmd(port), port=port, log_path=tmp_path / "s.log",
                       startup_timeout_s=30) as srv:
        spec = EngineSpec(kind="openai", base_url=srv.base_url, model="m", serves="cand")
        sel = EngineSelectionSpec(engines={"sglang": spec}, sweep=SweepSpec(levels=[1], requests_per_level=2))
        ctx = {"selection": sel, "run": RunFolder(tmp_path), "cost": None,
               "prompts": PromptSource(["some words to cut prompts from"] * 3),
               "workload": WorkloadSpec(requests=3, concurrency=1, warmup_requests=0, timeout_s=20,
                                        mix=[LengthClass(name="s", prompt_tokens=4, output_tokens=3)])}
        art = Artifact("cand", "/w/cand", "gptq", "gptq", bits=4, group_size=64, sym=True)
        cell, pair = run_pair("sglang", spec, art, ctx, log=lambda m: None)
        other, none = run_pair("sglang", spec, Artifact("base", "/w/base", "dense"), ctx, log=lambda m: None)
    assert cell["observed"]["loads"] and pair["measured"] and pair["metrics"]["error_rate"] == 0
    assert pair["knee"]["concurrency"] == 1 and "launch" not in pair
    assert deployment_of(pair)["provider"] == {"kind": "openai", "base_url": srv.base_url + "/v1", "model": "m"}
    assert none is None and other["expected"]["status"] == "no"  # that server serves another model
