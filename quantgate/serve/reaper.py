"""The reaper: stopping the engines a gateway that is gone left running.

A gateway that dies without stopping its engines (SIGKILL, the OOM killer) leaves them running,
holding memory and GPUs. So every engine process group the supervisor spawns is recorded, as soon
as it exists, in a ledger beside the engine logs (`<log dir>/gateway-<pid>.json`: this gateway's
pid, start time, host, boot id and PID namespace, and each group's leader pid, start time,
deployment and the random token given to that spawn's environment). Before its first spawn, the next
gateway on the same manifest folder reads every ledger there and kills what is left of the groups
of the ones whose gateway is gone — only processes of that session that carry the group's token, so
a reused pid, a forged or stale ledger, another host's (a shared volume) or another container's is
never a reason to kill anything; a live replica's ledger (and engines) are left alone. A gateway
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

from ..procs import host_identity, kill_leftover_session, session_pids, started_at
from ..util import atomic_write_json

log = logging.getLogger("quantgate.serve")


def left_behind(ledgers: dict[str, dict], started_at, here: dict | None = None) -> list[str]:
    """The engine ledgers (name → {"gateway": {"pid", "started", "host", "boot_id", "pid_ns"},
    "groups": [...]}) whose gateway is gone: it ran in this boot and its pid names no process, or a
    later one (`started_at(pid)` → start time or None), or it ran before this boot. Their groups were
    left running by a gateway that could not stop them (SIGKILL, the OOM killer). A ledger written on
    another host or in another PID namespace (`here` is procs.host_identity(): a shared volume,
    another container) is never judged from here: its pids are not this machine's."""
    gone = []
    for name, ledger in ledgers.items():
        owner = ledger.get("gateway")
        owner = owner if isinstance(owner, dict) else {}
        if here is not None and any(owner.get(k) != here.get(k) for k in ("host", "pid_ns")):
            continue
        if here is not None and owner.get("boot_id") != here.get("boot_id"):
            gone.append(name)  # before a reboot: nothing of it runs (what has its pids now is not it)
            continue
        pid, started = owner.get("pid"), owner.get("started")
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

    def record(self, pid: int, deployment: str, token: str) -> None:
        """A group exists now (called in the start thread as soon as its leader is spawned); `token`
        is the identity its processes carry in their environment (procs.TOKEN_ENV)."""
        with self._lock:
            if self._me is None:
                self._me = {"pid": self.pid, "started": started_at(self.pid), **host_identity()}
            self._groups = {p: g for p, g in self._groups.items() if session_pids(p)}  # drop stopped ones
            self._groups[pid] = {"pid": pid, "started": started_at(pid), "deployment": deployment, "token": token}
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
        here = host_identity()
        for name in left_behind({k: v for k, v in ledgers.items() if isinstance(v, dict)}, started_at, here):
            owner = ledgers[name].get("gateway")
            owner = owner.get("pid") if isinstance(owner, dict) else None
            groups = ledgers[name].get("groups")
            for g in groups if isinstance(groups, list) else []:
                pid, started, token = ((g.get("pid"), g.get("started"), g.get("token")) if isinstance(g, dict)
                                       else (None, None, None))
                if not (isinstance(pid, int) and isinstance(started, int) and pid > 1):
                    continue
                if not (isinstance(token, str) and len(token) >= 16):
                    log.warning("engine ledger %s names group %d without an identity token: nothing of it is "
                                "provably an engine of this folder, left alone", name, pid)
                    continue
                killed = kill_leftover_session(pid, started, token)
                if killed:
                    log.warning("stopped engine %s (process group %d, %d process(es)) left running by gateway "
                                "pid %s, which is gone", g.get("deployment", "?"), pid, len(killed), owner)
            try:
                Path(name).unlink(missing_ok=True)
            except OSError as exc:  # never a reason not to serve
                log.warning("engine ledger %s could not be removed (%s)", name, exc)
