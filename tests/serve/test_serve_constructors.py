"""Building the supervisor's objects does no I/O (no socket, no /proc, no file): an engine takes
its port when it is started, the reaper reads this gateway's start time at its first record."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantgate.serve import reaper, supervisor
from quantgate.serve.supervisor import Engine, Supervisor


def test_an_engine_and_a_supervisor_are_built_without_io(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "free_port", lambda: pytest.fail("took a port in a constructor"))
    monkeypatch.setattr(reaper, "started_at", lambda pid: pytest.fail("read /proc in a constructor"))
    d = SimpleNamespace(name="d", key="d@1", engine=SimpleNamespace(kind="vllm"))  # what an engine reads of it
    Supervisor(tmp_path / "logs")
    e = Engine("k", d, tmp_path / "logs")
    assert e.port is None and e.status()["port"] is None
    assert not (tmp_path / "logs").exists()
