"""The reaper alone (serve/reaper.py): its ledger of spawned groups, the sweep of what gateways that
are gone left running, and its removal on a clean stop. No gateway, no supervisor: a sleeping child
process in a session of its own stands for an engine group."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

import os

from quantgate.procs import TOKEN_ENV, host_identity, started_at
from quantgate.serve import reaper as reaper_mod
from quantgate.serve.reaper import Reaper


TOKEN = "f" * 32  # the identity the supervisor gives a spawn's environment


@pytest.fixture
def group():
    """A live process group (session leader) standing for an engine, carrying its spawn's token;
    killed if a test leaves it."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         env={**os.environ, TOKEN_ENV: TOKEN})
    yield p
    if p.poll() is None:
        p.kill()
        p.wait(10)


def test_building_a_reaper_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(reaper_mod, "started_at", lambda pid: pytest.fail("read /proc in the constructor"))
    r = Reaper(tmp_path / "logs" / "engines", pid=4242)
    assert r.path == tmp_path / "logs" / "engines" / "gateway-4242.json"
    assert not (tmp_path / "logs").exists()


def test_a_spawned_group_is_recorded_and_a_stopped_one_dropped_at_the_next_record(tmp_path, group):
    r = Reaper(tmp_path / "engines")
    r.record(group.pid, "blue@1", TOKEN)
    doc = json.loads(r.path.read_text())
    assert doc["gateway"]["started"] == started_at(doc["gateway"]["pid"])
    assert {k: doc["gateway"][k] for k in ("host", "boot_id", "pid_ns")} == host_identity()
    assert doc["groups"] == [{"pid": group.pid, "started": started_at(group.pid), "deployment": "blue@1",
                              "token": TOKEN}]
    group.kill()
    group.wait(10)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        r.record(other.pid, "green@2", "e" * 32)
        assert [g["pid"] for g in json.loads(r.path.read_text())["groups"]] == [other.pid]
    finally:
        other.kill()
        other.wait(10)
    r.forget()
    assert not r.path.exists()
    r.forget()  # twice is fine: a gateway that spawned nothing has no ledger


def test_the_sweep_kills_what_a_gone_gateway_left_and_leaves_a_live_one_alone(tmp_path, group):
    log_dir = tmp_path / "engines"
    log_dir.mkdir()
    entry = {"pid": group.pid, "started": started_at(group.pid), "deployment": "blue@1", "token": TOKEN}
    gone = log_dir / "gateway-1.json"   # pid 1 never started at tick -1: that gateway is gone
    gone.write_text(json.dumps({"gateway": {"pid": 1, "started": -1, **host_identity()},
                                "groups": [entry, {"pid": 1}, "junk"]}))
    live = Reaper(log_dir)
    live.record(group.pid, "blue@1", TOKEN)    # a live replica (this process) recorded the same group
    garbled = log_dir / "gateway-7.json"
    garbled.write_text("{not json")
    Reaper(log_dir, pid=99).sweep()
    assert group.wait(10) == -signal.SIGKILL
    assert not gone.exists()
    assert live.path.exists() and garbled.exists()  # a live replica's ledger, and one it cannot read, stay


def test_a_live_gateways_groups_survive_the_sweep(tmp_path, group):
    live = Reaper(tmp_path)
    live.record(group.pid, "blue@1", TOKEN)
    Reaper(tmp_path, pid=99).sweep()
    assert group.poll() is None and live.path.exists()


def test_every_first_spawn_waits_for_one_sweep(tmp_path, monkeypatch):
    r, sweeps = Reaper(tmp_path), []
    monkeypatch.setattr(r, "sweep", lambda: sweeps.append(1))

    async def main():
        await asyncio.gather(r.swept(), r.swept(), r.swept())
        await r.swept()

    asyncio.run(main())
    assert sweeps == [1]


def test_a_ledger_that_cannot_prove_its_groups_kills_nothing(tmp_path, group):
    """A forged or stale ledger naming a live session: without the spawn's token in the processes'
    environment, or from another host (a shared volume), nothing is killed."""
    log_dir = tmp_path / "engines"
    log_dir.mkdir()
    entry = {"pid": group.pid, "started": started_at(group.pid), "deployment": "blue@1"}
    here = host_identity()
    (log_dir / "gateway-1.json").write_text(json.dumps(
        {"gateway": {"pid": 1, "started": -1, **here}, "groups": [{**entry, "token": "0" * 32}]}))  # wrong token
    (log_dir / "gateway-2.json").write_text(json.dumps(
        {"gateway": {"pid": 1, "started": -1, **here}, "groups": [entry]}))  # no token at all
    other_host = log_dir / "gateway-3.json"
    other_host.write_text(json.dumps({"gateway": {"pid": 1, "started": -1, **here, "host": here["host"] + "-x"},
                                      "groups": [{**entry, "token": TOKEN}]}))
    Reaper(log_dir, pid=99).sweep()
    assert group.poll() is None
    assert other_host.exists()  # not this machine's to judge
