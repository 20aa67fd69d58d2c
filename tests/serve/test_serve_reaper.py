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

from quantgate.procs import started_at
from quantgate.serve import reaper as reaper_mod
from quantgate.serve.reaper import Reaper


@pytest.fixture
def group():
    """A live process group (session leader) standing for an engine; killed if a test leaves it."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
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
    r.record(group.pid, "blue@1")
    doc = json.loads(r.path.read_text())
    assert doc["gateway"]["started"] == started_at(doc["gateway"]["pid"])
    assert doc["groups"] == [{"pid": group.pid, "started": started_at(group.pid), "deployment": "blue@1"}]
    group.kill()
    group.wait(10)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        r.record(other.pid, "green@2")
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
    entry = {"pid": group.pid, "started": started_at(group.pid), "deployment": "blue@1"}
    gone = log_dir / "gateway-1.json"   # pid 1 never started at tick -1: that gateway is gone
    gone.write_text(json.dumps({"gateway": {"pid": 1, "started": -1}, "groups": [entry, {"pid": 1}, "junk"]}))
    live = Reaper(log_dir)
    live.record(group.pid, "blue@1")    # a live replica (this process) recorded the same group
    garbled = log_dir / "gateway-7.json"
    garbled.write_text("{not json")
    Reaper(log_dir, pid=99).sweep()
    assert group.wait(10) == -signal.SIGKILL
    assert not gone.exists()
    assert live.path.exists() and garbled.exists()  # a live replica's ledger, and one it cannot read, stay


def test_a_live_gateways_groups_survive_the_sweep(tmp_path, group):
    live = Reaper(tmp_path)
    live.record(group.pid, "blue@1")
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
