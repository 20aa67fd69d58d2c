"""The gateway supervises its engines (serve/supervisor.py) and switches blue/green on a manifest change.

Every engine here is a real process: tests/engines/fake_engine.py, started the way vLLM is
(`python -m vllm.entrypoints.openai.api_server --model ... --port ...`), on loopback, in its own
process group. The gateway is the real one (ServerThread, or `quantgate serve` as a subprocess);
the load generator is quantgate's own. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gwkit import write
from quantgate.evaluate.clients.openai_http import OpenAIClient
from quantgate.evaluate.loadgen import run_load
from quantgate.integrity import folder_checksums
from quantgate.procs import Command, session_pids
from quantgate.serve.manifest import ManifestError, parse_manifest
from quantgate.engine_spec import with_port
from quantgate.serve.cores import core_plan
from quantgate.serve.reaper import left_behind
from quantgate.serve.supervision import Life, Refs, backoff_s, engine_identity
from quantgate.workload import LengthClass, WorkloadSpec

pytestmark = pytest.mark.timeout(180)

FAKE = Path(__file__).resolve().parents[1] / "engines" / "fake_engine.py"
TEXTS = ["Tell me something about rivers and the sea in a few words please."] * 3
MIX = [LengthClass(name="s", prompt_tokens=12, output_tokens=6, weight=1)]


# ------------------------------------------------------------------------------ helpers
def artifact(root: Path, name: str) -> Path:
    d = root / f"art-{name}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "fake", "name": name}))
    (d / "model.safetensors").write_bytes(name.encode() * 64)
    return d


def engine_dep(root: Path, name: str, *flags: str, version: str = "1", startup_s: float = 30,
               max_model_len: int | None = None) -> dict:
    """A deployment whose 'vllm' engine is the fake engine; its pids go to root/pids-NAME."""
    art = artifact(root, name)
    argv = [sys.executable, str(FAKE), "-m", "vllm.entrypoints.openai.api_server", "--model", str(art),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", "8000", "--pid-file",
            str(root / f"pids-{name}"), "--reply", name, *flags]
    engine = {"kind": "vllm", "argv": argv, "python": sys.executable, "startup_timeout_s": startup_s,
              "source": "test"}
    if max_model_len:
        engine["max_model_len"] = max_model_len
    return {"name": name, "model_version": version, "artifact": str(art), "files": folder_checksums(art),
            "provider": {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": name, "timeout_s": 30},
            "engine": engine}


def manifest(active: dict, fallback: dict | None = None, **serving) -> dict:
    s = {"default_budget_ms": 10000, "max_budget_ms": 30000, "max_concurrency": 32, "anonymous": True,
         "reload_interval_s": 0.05, "cache": {"enabled": False}, **serving}
    if fallback is not None:
        s["fallback"] = fallback
    return {"schema_version": 2, "active": active, "serving": s}


def pids(root: Path, name: str) -> list[int]:
    f = root / f"pids-{name}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_members(leader: int) -> list[int]:
    """The live processes of an engine's session (the supervisor starts each in its own)."""
    return [p for p in session_pids(leader) if alive(p)]


def wait_until(pred, timeout_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(every_s)  # polling a condition under a deadline


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def ready(url: str, active: str | None = None):
    code, body = get_json(f"{url}/readyz")
    if code != 200:
        return None
    if active is not None and not body.get("active", "").startswith(active + "@"):
        return None
    engines = body.get("engines", {}).values()  # active and fallback
    return body if all(e["state"] == "ready" for e in engines) else None


def answer_of(url: str, prompt: str = "hi", **extra) -> tuple[int, dict, dict]:
    return post(f"{url}/chat", {"user_id": "u1", "prompt": prompt, "max_tokens": 4, **extra})


# ------------------------------------------------------------------------------ pure part
def test_a_verbatim_argv_takes_the_supervisors_port():
    argv = ["py", "-m", "x", "--port", "8000", "--model", "m"]
    assert with_port(argv, None, 4242) == ["py", "-m", "x", "--port", "4242", "--model", "m"]
    assert with_port(["py", "--port=8000"], "/venv/python", 5) == ["/venv/python", "--port=5"]
    assert with_port(["py", "-m", "x"], None, 7) == ["py", "-m", "x", "--port", "7"]
    assert with_port(["py", "--listen", "127.0.0.1:{port}"], None, 9) == ["py", "--listen", "127.0.0.1:9"]


def test_an_engine_is_identified_by_argv_env_and_checksums_not_port_or_serving_fields(tmp_path):
    d = engine_dep(tmp_path, "a")
    base = parse_manifest(json.dumps(manifest(d))).active
    same = dict(d, price={"output_per_1m": 3.0}, model_version="2")
    same["engine"] = dict(d["engine"], argv=[x if x != "8000" else "9999" for x in d["engine"]["argv"]])
    assert engine_identity(parse_manifest(json.dumps(manifest(same))).active) == engine_identity(base)
    env = dict(d, engine=dict(d["engine"], env={"OMP_NUM_THREADS": "1"}))
    files = dict(d, files={k: "0" * 64 for k in d["files"]})
    for other in (env, files):
        assert engine_identity(parse_manifest(json.dumps(manifest(other))).active) != engine_identity(base)


def test_a_new_cpu_engine_gets_the_cores_no_running_engine_holds():
    assert core_plan([0, 1], []) == [0]  # half the cores: the other half is free for the next switch
    assert core_plan([0, 1], [[0]]) == [1]  # green beside blue
    assert core_plan([0, 1], [[1]]) == [0]  # and back, at the next switch
    assert core_plan(list(range(8)), [[0, 1, 2, 3]]) == [4, 5, 6, 7]
    assert core_plan(list(range(8)), [[0, 1, 2, 3], [4, 5, 6, 7]], want=2) == [0, 1]  # none free: least shared
    assert core_plan([0, 1], [[0], [0]], want=5) == [0, 1]  # never more than allowed
    assert core_plan([3], [[3]]) == [3]  # one core: shared, never none
    assert core_plan([], []) == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(n, 0.5, 4) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1, 2, 4, 4, 4]


def test_life_of_an_engine():
    life = Life()
    assert life.state == "starting"
    life.became_ready()
    assert life.lost("exited (code 3)", now=10.0, retry=True) == 0.5
    assert (life.state, life.retry_at, life.error) == ("restarting", 10.5, "exited (code 3)")
    assert not life.due(10.4) and life.due(10.5)
    life.restart_begun()
    assert life.restarts == 1 and not life.due(99)
    assert life.lost("never answered", now=20.0, retry=True) == 1.0  # second failure in a row
    life.restart_begun()
    life.became_ready()
    assert life.failures == 0 and life.error is None
    life.refused("checksums")
    assert life.state == "failed" and not life.due(1e9)
    stopped = Life()
    stopped.stopped()
    assert stopped.lost("exit", 0.0, True) is None and stopped.state == "stopped"
    assert Life().lost("no", 0.0, retry=False) is None


def test_a_hung_engine_is_judged_on_misses_in_a_row():
    life = Life()
    life.became_ready()
    assert not life.unanswered(3) and not life.unanswered(3)
    life.answered()                       # one answer forgives the misses before it
    assert [life.unanswered(3) for _ in range(3)] == [False, False, True]
    life.lost("hung", now=0.0, retry=True)
    life.restart_begun()
    life.became_ready()
    assert life.misses == 0


def test_a_ledger_is_left_behind_when_its_gateway_pid_is_gone_or_names_a_later_process():
    running = {101: 5000, 102: 7000}          # pid -> start time, as /proc says
    ledgers = {"same": {"gateway": {"pid": 101, "started": 5000}},
               "gone": {"gateway": {"pid": 103, "started": 100}},
               "reused": {"gateway": {"pid": 102, "started": 6000}},   # pid 102 now names a later process
               "garbled": {"gateway": {"pid": "101"}}, "not a mapping": {"gateway": "101"}}
    assert left_behind(ledgers, running.get) == ["gone", "reused", "garbled", "not a mapping"]
    here = {"host": "h1", "boot_id": "b2", "pid_ns": "pid:[1]"}
    tied = {k: {"gateway": {**v["gateway"], **here}} for k, v in ledgers.items() if k in ("same", "gone", "reused")}
    other = {"shared volume": {"gateway": {"pid": 103, "started": 100, **here, "host": "h2"}},
             "other container": {"gateway": {"pid": 103, "started": 100, **here, "pid_ns": "pid:[9]"}},
             "before a reboot": {"gateway": {"pid": 101, "started": 5000, **here, "boot_id": "b1"}},
             "old ledger": {"gateway": {"pid": 103, "started": 100}}}  # no host: not provably this machine's
    assert left_behind({**tied, **other}, running.get, here) == ["gone", "reused", "before a reboot"]


def test_a_leftover_session_is_killed_only_while_its_leader_is_the_same_process_and_carries_the_token(tmp_path):
    from quantgate.procs import TOKEN_ENV, kill_leftover_session, started_at

    token = "a" * 32
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                              env={**os.environ, TOKEN_ENV: token})
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        t0 = started_at(leader.pid)
        assert kill_leftover_session(leader.pid, t0 + 1, token) == []   # a later process under that pid: not ours
        assert kill_leftover_session(leader.pid, t0, "b" * 32) == []    # not the token of that spawn
        # a session whose processes carry no token (a forged ledger naming someone's pid): untouched
        assert kill_leftover_session(stranger.pid, started_at(stranger.pid), token) == []
        assert leader.poll() is None and stranger.poll() is None
        assert kill_leftover_session(leader.pid, t0, token) == [leader.pid]
        assert leader.wait(10) == -signal.SIGKILL
    finally:
        for p in (leader, stranger):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_refs_start_with_the_first_user_and_stop_after_the_last():
    r = Refs()
    assert r.acquire("a") and not r.acquire("a")
    assert not r.release("a") and r.release("a") and not r.release("a")


# ------------------------------------------------------------------------------ a served engine
def test_the_gateway_starts_its_engines_answers_through_them_and_stops_them(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "blue", "--spawn-child"), engine_dep(tmp_path, "spare")))
    body = wait_until(lambda: ready(srv.url), 60, "the engines to be ready")
    assert body["engines"]["active"]["state"] == "ready" and body["engines"]["fallback"]["state"] == "ready"
    assert body["engines"]["active"]["log_tail"]  # the engine's own last lines, for admins
    code, _, ans = answer_of(srv.url)
    assert code == 200 and ans["text"].startswith("blue0") and ans["deployment"] == "blue"
    code, _, oa = post(f"{srv.url}/v1/chat/completions", {"model": "blue", "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200 and oa["choices"][0]["message"]["content"].startswith("blue0")
    assert oa["usage"]["completion_tokens"] == 3  # the engine's own usage
    report = asyncio.run(_load(srv.url, WorkloadSpec(requests=12, concurrency=3, mix=MIX, warmup_requests=0,
                                                     timeout_s=20)))  # streamed through the gateway
    assert report.aggregates.ok == 12
    leaders = pids(tmp_path, "blue") + pids(tmp_path, "spare")
    assert len(leaders) == 2 and all(alive(p) for p in leaders)
    children = group_members(pids(tmp_path, "blue")[0])
    assert len(children) == 2  # the engine and the worker it forked
    srv.stop()
    assert not [p for p in leaders + children if alive(p)], "an engine process outlived the gateway"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPU cores to start engines on disjoint cores")
def test_engines_started_side_by_side_are_pinned_to_different_cores(serve, tmp_path):
    """vLLM's own `auto` binding would put both on the same core (the switch then starves)."""
    srv = serve(manifest(engine_dep(tmp_path, "blue", "--spawn-child"), engine_dep(tmp_path, "spare", "--spawn-child")))
    body = wait_until(lambda: ready(srv.url), 60, "the engines to be ready")
    blue, spare = body["engines"]["active"], body["engines"]["fallback"]
    assert blue["cores"] and spare["cores"] and not set(blue["cores"]) & set(spare["cores"])
    for e in (blue, spare):  # the engine itself was started with that binding
        bind = ",".join(map(str, e["cores"]))
        assert f"VLLM_CPU_OMP_THREADS_BIND={bind}" in Path(e["log"]).read_text()
        # and its whole process tree runs there, the API server and the worker it forked included
        members = group_members(e["pid"])
        assert len(members) >= 2
        assert {tuple(sorted(os.sched_getaffinity(p))) for p in members} == {tuple(e["cores"])}
    srv.stop()


def test_an_engine_answers_only_the_gateway_that_started_it(serve, tmp_path):
    """Each engine is started with a secret of its own (vLLM's VLLM_API_KEY, llama.cpp's API_KEY): a
    local process that finds its port cannot use it around the gateway's budgets."""
    srv = serve(manifest(engine_dep(tmp_path, "blue")))
    body = wait_until(lambda: ready(srv.url), 60, "the engine to be ready")
    port = body["engines"]["active"]["port"]
    code, _, _ = post(f"http://127.0.0.1:{port}/v1/chat/completions",
                      {"model": "blue", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 401  # straight to the engine: refused
    code, _, ans = answer_of(srv.url)
    assert code == 200 and ans["text"].startswith("blue0")  # through the gateway: answered
    secret_in_log = [ln for ln in Path(body["engines"]["active"]["log"]).read_text().splitlines() if "API_KEY" in ln]
    assert secret_in_log == []


def test_a_squatter_on_the_engine_port_is_never_sent_a_prompt(serve, tmp_path, monkeypatch):
    """The port is picked, then bound seconds later: a local process that takes it first and answers
    the health path and the probe must not be mistaken for the engine."""
    from quantgate.procs import ServerProcess, free_port
    from quantgate.serve import supervisor

    port = free_port()
    squat_log = tmp_path / "squatter.log"
    squatter = ServerProcess("squatter", Command([sys.executable, str(FAKE), "-m", "vllm", "--port", str(port),
                                                   "--reply", "stolen"], {}), port=port, log_path=squat_log)
    squatter.start()
    try:
        monkeypatch.setattr(supervisor, "free_port", lambda: port)
        srv = serve(manifest(engine_dep(tmp_path, "blue", "--ready-after", "3")))  # it binds after the squatter answers
        err = wait_until(lambda: (get_json(f"{srv.url}/readyz")[1].get("engines", {}).get("active") or {}).get("error"),
                         60, "the engine's start to fail")
        assert "held by a process this gateway did not start" in err
        code, _, _ = answer_of(srv.url)
        assert code == 503  # no engine to answer: a 503, never the squatter's text
        assert "chat request" not in squat_log.read_text()  # not the probe, not a prompt
    finally:
        squatter.stop()


def test_an_over_long_prompt_is_refused_before_the_engine(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "short", max_model_len=128)))
    wait_until(lambda: ready(srv.url), 60, "the engine to be ready")
    code, headers, err = answer_of(srv.url, prompt="word " * 400)
    assert code == 413 and "shorten the prompt" in err["error"]["message"]
    assert "x-trace-id" in {k.lower() for k in headers}


# ------------------------------------------------------------------------------ blue/green
async def _load(url: str, workload: WorkloadSpec, model: str = "blue"):
    async with OpenAIClient(url, model) as eng:
        return await run_load(eng, workload, TEXTS)


class Loader(threading.Thread):
    """quantgate's load generator against the gateway, batch after batch, until told to stop."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.records, self.halt = url, [], threading.Event()

    def run(self):
        while not self.halt.is_set():
            rep = asyncio.run(_load(self.url, WorkloadSpec(requests=8, concurrency=4, mix=MIX, warmup_requests=0,
                                                           timeout_s=30)))
            self.records.extend(rep.records)

    def stop(self) -> list:
        self.halt.set()
        self.join(120)
        return self.records


def test_promote_rollback_promote_under_load_fails_no_request(serve, tmp_path):
    blue, green = engine_dep(tmp_path, "blue"), engine_dep(tmp_path, "green")
    srv = serve(manifest(blue))
    wait_until(lambda: ready(srv.url, "blue"), 60, "blue to be ready")
    load = Loader(srv.url)
    load.start()
    wait_until(lambda: len(load.records) >= 8, 60, "load before the first switch")
    for step, (new, old) in enumerate([(green, "blue"), (blue, "green"), (green, "blue")]):
        write(tmp_path / "manifest.json", manifest(new))
        wait_until(lambda: ready(srv.url, new["name"]), 60, f"switch {step} to {new['name']}")
        # the old engine stops once its in-flight requests are done
        wait_until(lambda: not any(alive(p) for p in pids(tmp_path, old)), 60, f"{old}'s engine to stop")
        seen = len(load.records)
        wait_until(lambda: len(load.records) >= seen + 8, 60, "load after the switch")
    records = load.stop()
    failed = [r for r in records if r.outcome != "ok"]
    assert len(records) >= 32 and not failed, failed[:3]
    assert len(pids(tmp_path, "blue")) == 2 and len(pids(tmp_path, "green")) == 2  # each (re)started per switch
    metrics = urllib.request.urlopen(f"{srv.url}/metrics", timeout=10).read().decode()
    assert 'quantgate_manifest_reloads_total{result="ok"} 3.0' in metrics


def test_a_new_engine_that_never_gets_ready_leaves_the_old_one_serving(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "blue")))
    wait_until(lambda: ready(srv.url, "blue"), 60, "blue to be ready")
    write(tmp_path / "manifest.json", manifest(engine_dep(tmp_path, "stuck", "--never-ready", startup_s=1.5)))
    body = wait_until(lambda: (get_json(f"{srv.url}/readyz")[1].get("engine_switch_failed") or None) and
                      get_json(f"{srv.url}/readyz")[1], 60, "the switch to be reported failed")
    assert body["status"] == "ready" and body["active"].startswith("blue@")
    assert "did not answer" in body["engine_switch_failed"]["error"]
    assert any("starting vllm" in x for x in body["engine_switch_failed"]["log_tail"])  # its own words
    code, _, ans = answer_of(srv.url)
    assert code == 200 and ans["text"].startswith("blue0")
    assert pids(tmp_path, "stuck") and not any(alive(p) for p in pids(tmp_path, "stuck"))
    metrics = urllib.request.urlopen(f"{srv.url}/metrics", timeout=10).read().decode()
    assert "quantgate_engine_switch_failed_total 1.0" in metrics


def test_a_checksum_mismatch_is_refused_before_the_engine_is_spawned(serve, tmp_path):
    bad = engine_dep(tmp_path, "tampered")
    (Path(bad["artifact"]) / "model.safetensors").write_bytes(b"something else")
    with pytest.raises(ManifestError, match=r"model.safetensors: changed"):
        serve(manifest(bad))
    assert not pids(tmp_path, "tampered")  # never spawned
    srv = serve(manifest(engine_dep(tmp_path, "blue")))
    wait_until(lambda: ready(srv.url, "blue"), 60, "blue to be ready")
    write(tmp_path / "manifest.json", manifest(bad))
    body = wait_until(lambda: (get_json(f"{srv.url}/readyz")[1].get("engine_switch_failed") or None) and
                      get_json(f"{srv.url}/readyz")[1], 60, "the refusal to be reported")
    assert "does not match the manifest's checksums" in body["reload_error"] and body["active"].startswith("blue@")
    assert not pids(tmp_path, "tampered")
    assert answer_of(srv.url)[0] == 200


# ------------------------------------------------------------------------------ crashes
def test_an_engine_killed_mid_load_is_restarted_while_the_fallback_answers(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "blue"), engine_dep(tmp_path, "spare")))
    wait_until(lambda: ready(srv.url, "blue"), 60, "both engines ready")
    srv.gateway.supervisor.backoff_base_s = 1.0  # the restart waits long enough for the fallback to answer
    results, halt = [], threading.Event()

    def client():
        while not halt.is_set():
            results.append(answer_of(srv.url))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: len(results) >= 10, 60, "load before the kill")
    first = pids(tmp_path, "blue")[0]
    os.killpg(first, signal.SIGKILL)
    wait_until(lambda: any(a[2].get("deployment") == "spare" for a in results if a[0] == 200), 60,
               "the fallback to answer while blue is down")
    wait_until(lambda: len(pids(tmp_path, "blue")) == 2 and ready(srv.url, "blue"), 60, "blue restarted")
    n = len(results)
    wait_until(lambda: len(results) >= n + 10, 60, "load after the restart")
    halt.set()
    for c in clients:
        c.join(60)
    for code, headers, body in results:
        if code != 200:  # a clear 5xx that names the trace id, never a hang or a 4xx
            assert code in (502, 503, 504), (code, body)
            assert headers.get("x-trace-id") or headers.get("X-Trace-Id"), body
    assert results[-1][0] == 200 and results[-1][2]["deployment"] == "blue"
    status = get_json(f"{srv.url}/readyz")[1]["engines"]["active"]
    assert status["restarts"] == 1 and status["state"] == "ready"
    metrics = urllib.request.urlopen(f"{srv.url}/metrics", timeout=10).read().decode()
    assert 'quantgate_engine_restarts_total{deployment="blue",model_version="1"} 1.0' in metrics


def test_a_hung_engine_is_killed_and_restarted_while_the_fallback_answers(serve, tmp_path):
    """Alive but frozen (SIGSTOP): it never exits, so only the liveness check can tell."""
    blue = engine_dep(tmp_path, "blue")
    blue["engine"]["health"] = {"every_s": 0.1, "timeout_s": 0.3, "misses": 2}
    srv = serve(manifest(blue, engine_dep(tmp_path, "spare")))
    wait_until(lambda: ready(srv.url, "blue"), 60, "both engines ready")
    srv.gateway.supervisor.backoff_base_s = 2.0  # the restart waits long enough to see the fallback answer
    first = pids(tmp_path, "blue")[0]
    os.killpg(first, signal.SIGSTOP)
    try:
        active = wait_until(lambda: (lambda a: a if a["state"] == "restarting" else None)(
            get_json(f"{srv.url}/readyz")[1]["engines"]["active"]), 30, "blue taken out of rotation")
        assert "did not answer /v1/models within 0.3 s, 2 times in a row (hung)" in active["error"]
        code, _, body = answer_of(srv.url)
        assert code == 200 and body["deployment"] == "spare"
        wait_until(lambda: not alive(first), 30, "the frozen engine killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first, signal.SIGCONT)
    wait_until(lambda: len(pids(tmp_path, "blue")) == 2 and ready(srv.url, "blue"), 60, "blue restarted")
    code, _, body = answer_of(srv.url)
    assert code == 200 and body["deployment"] == "blue"
    status = get_json(f"{srv.url}/readyz")[1]["engines"]["active"]
    assert status["restarts"] == 1 and "health_misses" not in status


def test_no_deployment_ready_is_a_clear_503(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "slow", "--never-ready", startup_s=60)))
    code, body = get_json(f"{srv.url}/readyz")
    assert code == 503 and body["engines"]["active"]["state"] == "starting"
    code, headers, err = answer_of(srv.url)
    assert code == 503 and err["error"]["type"] == "engine_unavailable" and "trace id" in err["error"]["message"]
    assert headers.get("Retry-After")


# ------------------------------------------------------------------------------ `quantgate serve`
def test_sigterm_to_quantgate_serve_leaves_no_engine_process(tmp_path):
    path = write(tmp_path / "manifest.json", manifest(engine_dep(tmp_path, "blue", "--spawn-child"),
                                                      engine_dep(tmp_path, "spare")))
    from quantgate.procs import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "quantgate", "serve", str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until(lambda: proc.poll() is None and _ready_or_none(f"http://127.0.0.1:{port}"), 90,
                   "`quantgate serve` and its engines to be ready")
        leaders = pids(tmp_path, "blue") + pids(tmp_path, "spare")
        everything = leaders + [c for p in leaders for c in group_members(p)]
        assert len(set(everything)) == 3  # two engines and blue's worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]
        assert not [p for p in everything if alive(p)], "an engine process outlived `quantgate serve`"
    finally:
        _terminate(proc)


def _terminate(gateway: subprocess.Popen) -> None:
    """SIGTERM first even when an assertion failed: a SIGKILLed gateway cannot stop its engines."""
    if gateway.poll() is None:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)


def _serve(path: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "quantgate", "serve", str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)


def test_engines_a_killed_gateway_left_are_stopped_by_the_next_one_not_by_a_live_replica(tmp_path):
    from quantgate.procs import free_port

    path = write(tmp_path / "manifest.json", manifest(engine_dep(tmp_path, "blue", "--spawn-child")))
    gateways, orphans = [], []
    try:
        first = _serve(path, free_port(), tmp_path / "first.log")
        gateways.append(first)
        wait_until(lambda: pids(tmp_path, "blue"), 90, "the first gateway's engine spawned")
        orphan = pids(tmp_path, "blue")[0]
        wait_until(lambda: len(group_members(orphan)) == 2, 60, "the engine and its worker")
        orphans += group_members(orphan)
        first.kill()                      # SIGKILL: nothing of the gateway runs to stop its engines
        first.wait(30)
        assert all(alive(p) for p in orphans)
        port = free_port()
        second = _serve(path, port, tmp_path / "second.log")
        gateways.append(second)
        wait_until(lambda: _ready_or_none(f"http://127.0.0.1:{port}"), 90, "the second gateway ready")
        assert not [p for p in orphans if alive(p)], "the dead gateway's engine is still running"
        log = (tmp_path / "second.log").read_text()
        assert f"left running by gateway pid {first.pid}, which is gone" in log and "2 process(es)" in log
        mine = [p for p in pids(tmp_path, "blue") if p != orphan]
        # a replica started on the same folder while the second is alive leaves its engines alone
        port3 = free_port()
        third = _serve(path, port3, tmp_path / "third.log")
        gateways.append(third)
        wait_until(lambda: _ready_or_none(f"http://127.0.0.1:{port3}"), 90, "the third gateway ready")
        assert mine and all(alive(p) for p in mine)
        assert "left running" not in (tmp_path / "third.log").read_text()
    finally:
        for g in gateways:
            _terminate(g)
        for p in orphans:  # a failed assertion must not leave the dead gateway's engine running
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def _ready_or_none(url: str):
    try:
        return ready(url)
    except OSError:
        return None


def test_stopping_the_gateway_mid_switch_stops_the_engine_still_starting(serve, tmp_path):
    srv = serve(manifest(engine_dep(tmp_path, "blue")))
    wait_until(lambda: ready(srv.url, "blue"), 60, "blue to be ready")
    write(tmp_path / "manifest.json", manifest(engine_dep(tmp_path, "late", "--ready-after", "120", startup_s=300)))
    late = wait_until(lambda: pids(tmp_path, "late"), 60, "the new engine to be spawned")
    assert answer_of(srv.url)[2]["deployment"] == "blue"  # still on the old plan while the new one starts
    srv.stop()
    assert not [p for p in late + pids(tmp_path, "blue") if alive(p)], "an engine outlived the gateway"


def test_engines_never_inherit_the_gateways_keys(serve, tmp_path, monkeypatch):
    """The engine's environment has what the spec sets, not the gateway's tenant/admin keys or
    anything else named like a credential (an engine is another program with its own bugs)."""
    monkeypatch.setenv("TEAM_A_GATEWAY", "tenant-key-0123456789")  # named by the manifest: withheld
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")  # named like a credential: withheld
    monkeypatch.setenv("QUANTGATE_HARMLESS", "kept")
    m = manifest(engine_dep(tmp_path, "blue"), anonymous=False, api_keys={"team-a": [{"env": "TEAM_A_GATEWAY"}]})
    serve(m)
    leader = wait_until(lambda: pids(tmp_path, "blue"), 60, "the engine to be spawned")[0]
    env = dict(x.split("=", 1) for x in Path(f"/proc/{leader}/environ").read_text().split("\0") if "=" in x)
    assert "TEAM_A_GATEWAY" not in env and "MLFLOW_TRACKING_PASSWORD" not in env
    assert env["QUANTGATE_HARMLESS"] == "kept" and env.get("VLLM_API_KEY")  # its own secret it has
