"""`quantgate loadtest` end to end against a local streaming server (in a thread: the command
runs its own event loop), and its errors for people."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loadgen_fakes import ServerThread
from quantgate.errors import QuantgateError
from quantgate.evaluate.loadtest_cli import load_workload, register

pytestmark = pytest.mark.timeout(60)

WORKLOAD = """
requests: 6
concurrency: 2
warmup_requests: 1
prompts_file: prompts.jsonl
slo:
  ttft_ms: 2000
mix:
  - {name: short, weight: 2, prompt_tokens: 8, output_tokens: 3}
  - {name: long, weight: 1, prompt_tokens: 32, output_tokens: 6}
"""


@pytest.fixture()
def app() -> typer.Typer:
    a = typer.Typer()
    register(a)

    @a.callback()  # a group, as in quantgate's own app, so `loadtest` is a subcommand
    def _root():
        pass

    return a


@pytest.fixture()
def workload_file(tmp_path: Path) -> Path:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Tell me about rivers and the sea."}\n'
                                            '{"prompt": "How is bread made?"}\n')
    p = tmp_path / "w.yaml"
    p.write_text(WORKLOAD)
    return p


def test_loadtest_runs_and_writes_its_report(app, workload_file, tmp_path):
    out = tmp_path / "out" / "report.json"
    with ServerThread(ttft=0.005) as srv:
        res = CliRunner().invoke(app, ["loadtest", "--url", srv.url, "--workload", str(workload_file),
                                       "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "TTFT" in res.output and "goodput" in res.output and "per kind" in res.output
    d = json.loads(out.read_text())
    assert d["model"] == "fake-model"  # no --model: asked the server's /v1/models
    assert len(d["records"]) == 6 and len(d["warmup"]) == 1
    assert d["aggregates"]["ok"] == 6 and d["aggregates"]["slo_attainment"] == 1.0
    assert set(d["aggregates"]["per_kind"]) <= {"short", "long"}
    assert d["workload"]["concurrency"] == 2
    assert any("rivers" in b["messages"][0]["content"] for b in srv.bodies)  # the prompts file beside it
    assert not list(out.parent.glob(".*.tmp"))  # written atomically


def test_options_override_the_workload_and_prompts_fall_back_to_built_in_text(app, tmp_path):
    out = tmp_path / "r.json"
    with ServerThread() as srv:
        res = CliRunner().invoke(app, ["loadtest", "--url", srv.url + "/v1", "--model", "m", "--requests", "3",
                                       "--concurrency", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    d = json.loads(out.read_text())
    assert d["workload"]["requests"] == 3 and d["workload"]["concurrency"] == 3 and d["model"] == "m"
    assert srv.max_in_flight <= 3 and srv.bodies[0]["model"] == "m"
    assert "quantgate fetch" in res.output  # the corpus is not fetched in the test cache: said, then built-in text


def test_unreachable_server_is_an_error_for_people(app, tmp_path):
    res = CliRunner().invoke(app, ["loadtest", "--url", "http://127.0.0.1:9", "--model", "m", "--requests", "2"])
    assert isinstance(res.exception, QuantgateError)
    assert "no request to http://127.0.0.1:9 succeeded" in str(res.exception)
    assert "cannot reach" in str(res.exception)


def test_bad_workload_files_name_the_file_and_field(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("requests: 5\nconcurency: 3\n")
    with pytest.raises(QuantgateError, match=r"w\.yaml:2: concurency: unknown field 'concurency'; did you mean 'concurrency'"):
        load_workload(p)
    p.write_text("slo:\n  ttft_ms: -5\n")
    with pytest.raises(QuantgateError, match=r"w\.yaml:2: slo\.ttft_ms: Input should be greater than 0"):
        load_workload(p)
    p.write_text("arrival: poisson\n")
    with pytest.raises(QuantgateError, match="needs 'rate'"):
        load_workload(p)
    p.write_text("requests: [1\n")
    with pytest.raises(QuantgateError, match=r"w\.yaml:\d+: not valid YAML"):
        load_workload(p)
    j = tmp_path / "w.json"
    j.write_text('{"requests": 3, "mix": [{"name": "s", "prompt_tokens": 4, "output_tokens": 2}]}')
    assert load_workload(j).mix[0].name == "s"
    j.write_text('{"requests": }')
    with pytest.raises(QuantgateError, match=r"w\.json:1:\d+: not valid JSON"):
        load_workload(j)
    with pytest.raises(QuantgateError, match="nope.yaml: no such workload file"):
        load_workload(tmp_path / "nope.yaml")


def test_loadtest_replays_a_trace(app, workload_file, tmp_path):
    trace = tmp_path / "gw.jsonl"  # as the gateway writes it (serving.trace): a header, then requests
    trace.write_text('{"quantgate_trace": 1, "started": "2026-01-01T00:00:00+00:00"}\n'
                     '{"t": 0.0, "prompt_tokens": 12, "output_tokens": 4, "max_tokens": 16}\n'
                     '{"t": 0.5, "prompt_tokens": 40, "output_tokens": 2, "max_tokens": 2}\n'
                     '{"t": 1.5, "prompt_tokens": 12, "output_tokens": 0, "max_tokens": 7}\n')
    older = tmp_path / "gw.jsonl.1"  # what it rotated out before: replayed first
    older.write_text('{"quantgate_trace": 1, "started": "2025-12-31T00:00:00+00:00"}\n'
                     '{"t": 0.0, "prompt_tokens": 20, "output_tokens": 3, "max_tokens": 3}\n')
    out = tmp_path / "r.json"
    with ServerThread() as srv:
        res = CliRunner().invoke(app, ["loadtest", "--url", srv.url, "--model", "m", "--workload", str(workload_file),
                                       "--trace", str(trace), "--time-scale", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    d = json.loads(out.read_text())
    assert d["workload"]["trace"] == str(trace) and d["workload"]["time_scale"] == 0
    assert len(d["records"]) == 4  # the trace's requests (both files), not the workload's 6
    assert f"{older}, {trace}" in res.output
    sent = sorted(b["max_tokens"] for b in srv.bodies)
    assert sent == [2, 3, 3, 4, 7]  # the warm-up repeats the oldest request; no output recorded: its max_tokens
    # each prompt is the recorded length by the ~4 chars/token estimate a gateway without a tokenizer uses
    assert sorted(len(b["messages"][0]["content"]) for b in srv.bodies) == [48, 48, 80, 80, 160]


def test_a_bad_trace_is_named(app, tmp_path):
    trace = tmp_path / "gw.jsonl"
    trace.write_text('{"t": "soon"}\n')
    res = CliRunner().invoke(app, ["loadtest", "--url", "http://127.0.0.1:9", "--model", "m", "--trace", str(trace)])
    assert res.exit_code != 0
    assert "line 1" in str(res.exception) and str(trace) in str(res.exception)
