"""Pure decisions of the engine supervisor: which deployments need a process, what identifies one,
the command line it is started with, the life of a started engine, and the backoff between restarts.

No clock, no process, no I/O: `serve/supervisor.py` does those and asks this module what to do.

An engine's identity is (argv, env, interpreter, the artifact's checksums), not the deployment's
name or prices: two deployments that would start the same process share one, a re-promotion that
only changes serving settings keeps the running engine, and a changed file or flag starts a new one
beside the old (blue/green). The port is not part of the identity: the supervisor gives every
started engine a free loopback port of its own, so old and new can run side by side.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..engine_spec import PORT, Served
from ..procs import Command
from .manifest import Deployment

STATES = ("starting", "ready", "restarting", "failed", "stopped")


def launched(d: Deployment | None) -> bool:
    """True when the gateway starts this deployment's engine itself."""
    return d is not None and d.engine is not None and d.engine.launched


def launch_command(d: Deployment, port) -> Command:
    """The command that starts `d`'s engine on `port`, built from its EngineSpec (or its verbatim
    argv); engine_spec.PORT in place of a port gives the command an identity is made of."""
    return d.engine.command(Served(d.artifact, d.provider.model), port)


def engine_identity(d: Deployment) -> str:
    """What makes two launched engines the same process (hex digest; see the module docstring)."""
    cmd = launch_command(d, PORT)
    doc = {"argv": cmd.argv, "env": cmd.env, "python": d.engine.python, "artifact": d.artifact,
           "files": d.files, "sha256": d.sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def backoff_s(failures: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Wait before restart number `failures` (1, 2, …): base, 2×base, 4×base … capped."""
    return min(cap_s, base_s * 2 ** max(0, failures - 1))


@dataclass
class Life:
    """One started engine's state: starting → ready; a crash or a failed start → restarting (retry at
    `retry_at`, backoff doubling per consecutive failure); failed: given up (checksums refused, or
    a blue/green candidate that did not come up); stopped: no longer used."""

    state: str = "starting"
    restarts: int = 0           # restarts begun since the first start
    failures: int = 0           # consecutive failures (reset when ready): sets the backoff
    retry_at: float | None = None
    error: str | None = None
    misses: int = 0             # liveness checks unanswered in a row while ready

    def became_ready(self) -> None:
        self.state, self.failures, self.retry_at, self.error, self.misses = "ready", 0, None, None, 0

    def answered(self) -> None:
        self.misses = 0

    def unanswered(self, limit: int) -> bool:
        """One more liveness check without an answer; True once `limit` in a row: it is hung."""
        self.misses += 1
        return self.misses >= limit

    def lost(self, why: str, now: float, retry: bool, base_s: float = 0.5, cap_s: float = 30.0) -> float | None:
        """It exited or never answered; returns the delay before the next start (None: given up)."""
        self.error = why
        if self.state == "stopped":
            return None
        if not retry:
            self.state, self.retry_at = "failed", None
            return None
        self.failures += 1
        delay = backoff_s(self.failures, base_s, cap_s)
        self.state, self.retry_at = "restarting", now + delay
        return delay

    def refused(self, why: str) -> None:
        """Never (re)started: its files differ from the manifest's checksums."""
        self.state, self.retry_at, self.error = "failed", None, why

    def due(self, now: float) -> bool:
        return self.state == "restarting" and self.retry_at is not None and now >= self.retry_at

    def restart_begun(self) -> None:
        self.restarts += 1
        self.retry_at = None

    def stopped(self) -> None:
        self.state, self.retry_at = "stopped", None


class Refs:
    """Which engines the runtimes in force use: an engine starts with its first user and stops
    after its last (a retired runtime releases its engines when its last request is done)."""

    def __init__(self):
        self.n: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Count one more user; True when it is the first (start the engine)."""
        self.n[key] = self.n.get(key, 0) + 1
        return self.n[key] == 1

    def release(self, key: str) -> bool:
        """Count one user less; True when it was the last (stop the engine)."""
        if key not in self.n:
            return False
        self.n[key] -= 1
        if self.n[key] <= 0:
            del self.n[key]
            return True
        return False
