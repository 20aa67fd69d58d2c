"""The reaper: stopping the engines a gateway that is gone left running.

A gateway that dies without stopping its engines (SIGKILL, the OOM killer) leaves them running,
holding memory and GPUs. So every engine process group the supervisor spawns is recorded, as soon
as it exists, in a ledger beside the engine logs (`<log dir>/gateway-<pid>.json`: this gateway's
pid and start time, and each group's leader pid, start time and deployment). Before its first
spawn, the next gateway on the same manifest folder reads every ledger there and kills the groups
of the ones whose gateway is gone; a live replica's ledger (and engines) are left alone. A gateway
that stops normally stopped its groups itself and removes its ledger (`forget`).

`left_behind` is the pure decision; `Reaper` is the I/O around it (ledger files, /proc, signals).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path

from ..procs import kill_leftover_session, session_pids, started_at
from ..util import atomic_write_json

log = logging.getLogger("quantgate.serve")


def left_behind(ledgers: dict[str, dict], started_at) -> list[str]:
    """The engine ledgers (name → {"gateway": {"pid", "started"}, "groups": [...]}) whose gateway is
    gone: its pid names no process, or a later one (`started_at(pid)` → start time or None). Their
    groups were left running by a gateway that could not stop them (SIGKILL, the OOM killer)."""
    gone = []
    for name, ledger in ledgers.items():
        owner = ledger.get("gateway")
        pid, started = (owner.get("pid"), owner.get("started")) if isinstance(owner, dict) else (None, None)
        if not isinstance(pid, int) or started_at(pid) != started:
            gone.append(name)
    return gone


class Reaper:
    """This gateway's ledger of spawned groups, and the one sweep of what gone gateways left."""

    def __init__(self, log_dir: Path, pid: int | None = None):
        self.log_dir = Path(log_dir)
        self.pid = os.getpid() if pid is None else pid
        self._me: dict | None = None  # {"pid", "started"}: read from /proc at the first record
        self._groups: dict[int, dict] = {}  # the process groups this gateway spawned
        self._lock = threading.Lock()  # groups are recorded from the start threads
        self._swept: asyncio.Future | None = None

    @property
    def path(self) -> Path:
        return self.log_dir / f"gateway-{self.pid}.json"

    async def swept(self) -> None:
        """Wait for the sweep of what gone gateways left, started by the first caller: every engine's
        first spawn waits for it (two engines acquired at start would otherwise race it)."""
        if self._swept is None:
            self._swept = asyncio.ensure_future(asyncio.to_thread(self.sweep))
        await asyncio.shield(self._swept)

    def record(self, pid: int, deployment: str) -> None:
        """A group exists now (called in the start thread as soon as its leader is spawned)."""
        with self._lock:
            if self._me is None:
                self._me = {"pid": self.pid, "started": started_at(self.pid)}
            self._groups = {p: g for p, g in self._groups.items() if session_pids(p)}  # drop stopped ones
            self._groups[pid] = {"pid": pid, "started": started_at(pid), "deployment": deployment}
            self.log_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"gateway": self._me, "groups": list(self._groups.values())})

    def forget(self) -> None:
        """Every group this gateway recorded is stopped: its ledger goes."""
        self.path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """Kill the engine groups recorded by gateways that are gone (see the module docstring)."""
        ledgers = {}
        for f in sorted(self.log_dir.glob("gateway-*.json")):
            try:
                ledgers[str(f)] = json.loads(f.read_text())
            except (OSError, ValueError) as exc:
                log.warning("engine ledger %s is unreadable (%s); left as it is", f, exc)
        for name in left_behind({k: v for k, v in ledgers.items() if isinstance(v, dict)}, started_at):
            owner = ledgers[name].get("gateway")
            owner = owner.get("pid") if isinstance(owner, dict) else None
            groups = ledgers[name].get("groups")
            for g in groups if isinstance(groups, list) else []:
                pid, started = (g.get("pid"), g.get("started")) if isinstance(g, dict) else (None, None)
                if not (isinstance(pid, int) and isinstance(started, int) and pid > 1):
                    continue
                killed = kill_leftover_session(pid, started)
                if killed:
                    log.warning("stopped engine %s (process group %d, %d process(es)) left running by gateway "
                                "pid %s, which is gone", g.get("deployment", "?"), pid, len(killed), owner)
            try:
                Path(name).unlink(missing_ok=True)
            except OSError as exc:  # never a reason not to serve
                log.warning("engine ledger %s could not be removed (%s)", name, exc)
