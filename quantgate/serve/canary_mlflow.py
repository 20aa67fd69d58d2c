"""A canary's story in MLflow: its steps, live figures and outcome on the challenger's run.

The manifest's canary block is the record; this copies it to the run the challenger came from — the
deployment's `params.mlflow` (tracking URI with credentials redacted, registered model, version, run
id), as `promote` records it — and moves the registry aliases: `challenger` on the challenger's
version while it runs; on promotion `champion` on it and `previous` on the stable's version; on a
rollback the `challenger` alias goes (only where it still points at this version) and the tag
`quantgate.canary.rollback` says why. Per history event: the weight and every numeric live figure
as metrics (MLflow step = the event's index, timestamp = its time), and the whole history as
`canary/history.json`.

What was copied is counted on the run (the tag `quantgate.canary.logged`: the canary's start and the
number of events), so copying again copies only what is new and a second canary of the same
candidate starts afresh. The gateway copies after each decision it writes, in a thread, one copy at a
time (`CanaryLog`); a tracking server that is down costs a warning and never the canary: the next
decision, or `quantgate canary log MANIFEST`, catches up from the file.

`plan()` is pure; `sync()` is the I/O (MLflow imported lazily).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from ..errors import require
from ..util import redact_uri, with_credentials
from .manifest import CanarySpec, Manifest

log = logging.getLogger("quantgate.serve")

LOGGED_TAG = "quantgate.canary.logged"
REACH_TIMEOUT_S = 3.0  # MLflow's own client retries an unreachable server for minutes


@dataclass
class Target:
    uri: str            # as the manifest has it (redacted)
    model: str
    version: str
    run_id: str | None


@dataclass
class Plan:
    """What to log for the events not logged yet (pure)."""

    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, timestamp ms, step
    tags: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str | None] = field(default_factory=dict)  # None: remove where it points at this version
    logged: str = ""
    history: list[dict] = field(default_factory=list)


def target(m: Manifest | None) -> Target | None:
    """The challenger's MLflow run and registry version, or None (no canary, or not from a tracked run)."""
    c = m.canary if m is not None else None
    reg = c.challenger.params.get("mlflow") if c is not None else None
    if not reg or not reg.get("uri") or not reg.get("model") or not reg.get("version"):
        return None
    return Target(reg["uri"], reg["model"], str(reg["version"]), reg.get("run_id"))


def _started(c: CanarySpec) -> str:
    return (c.history[0].when if c.history else c.step_started).isoformat()


def _done(logged: str | None, start: str) -> int:
    """Events of the canary that started at `start` the tag says were logged (another canary's: none)."""
    tag_start, _, n = (logged or "").rpartition(" ")
    return int(n) if tag_start == start and n.isdigit() else 0


def _stable(m: Manifest) -> dict | None:
    """The stable deployment's registry entry: active while the canary runs or after its rollback, the
    first previous one after its promotion."""
    c = m.canary
    dep = (m.previous[0] if m.previous else None) if c.state == "promoted" else m.active
    return dep.params.get("mlflow") if dep is not None else None


def plan(m: Manifest, logged: str | None) -> Plan:
    """What `sync` logs, given the run's `quantgate.canary.logged` tag (None: nothing logged yet)."""
    c, t = m.canary, target(m)
    start = _started(c)
    done = _done(logged, start)
    p = Plan(logged=f"{start} {len(c.history)}", history=[e.model_dump(mode="json") for e in c.history])
    for i, e in enumerate(c.history[done:], start=done):
        ts = int(e.when.timestamp() * 1000)
        p.metrics.append(("canary.weight", float(e.weight), ts, i))
        figs = e.figures or {}
        for arm in ("stable", "canary"):
            for k, v in (figs.get(arm) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    p.metrics.append((f"canary.{arm}.{k}", float(v), ts, i))
        if isinstance(figs.get("elapsed_s"), (int, float)):
            p.metrics.append(("canary.elapsed_s", float(figs["elapsed_s"]), ts, i))
    p.tags = {"quantgate.canary.state": c.state, "quantgate.canary.step": str(c.step),
              "quantgate.canary.weight": f"{c.weight:g}", "quantgate.canary.steps": ",".join(f"{w:g}" for w in c.steps),
              "quantgate.canary.challenger": c.challenger.key}
    if c.state == "running":
        p.aliases = {"challenger": t.version}
    elif c.state == "promoted":
        p.tags["quantgate.canary.outcome"] = "promoted"
        prev = _stable(m)
        p.aliases = {"champion": t.version, "challenger": None}
        if prev and prev.get("model") == t.model and prev.get("version"):
            p.aliases["previous"] = str(prev["version"])
    else:
        why = next((e.why for e in reversed(c.history) if e.what == "rollback"), "")
        p.tags["quantgate.canary.outcome"] = "rolled_back"
        p.tags["quantgate.canary.rollback"] = why[:4900] or "rolled back"
        p.aliases = {"challenger": None}
    return p


# --------------------------------------------------------------------------------- the I/O
def _reachable(uri: str) -> None:
    """Fail fast on a tracking server that is down (/health needs no credentials: the user part is left out)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.parse
    import urllib.request

    u = urllib.parse.urlsplit(uri)
    bare = u._replace(netloc=u.netloc.rpartition("@")[2], query="", fragment="")
    urllib.request.urlopen(bare.geturl().rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).read()


def sync(m: Manifest) -> int:
    """Copy what is new in the manifest's canary to the challenger's MLflow run and move the aliases;
    the number of history events copied (0: nothing new, or not from a tracked run). Raises what MLflow raises."""
    t = target(m)
    if t is None:
        return 0
    require("mlflow", what="logging the canary to MLflow", extra="track")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = with_credentials(t.uri)
    _reachable(uri)
    client = MlflowClient(uri)
    logged = client.get_run(t.run_id).data.tags.get(LOGGED_TAG) if t.run_id else None
    p = plan(m, logged)
    if t.run_id:
        for i in range(0, len(p.metrics), 500):  # log_batch takes at most 1000 metrics
            client.log_batch(t.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in p.metrics[i:i + 500]])
        for k, v in p.tags.items():
            client.set_tag(t.run_id, k, v)
        client.log_text(t.run_id, json.dumps(p.history, indent=1), "canary/history.json")
    for alias, version in p.aliases.items():
        if version is not None:
            client.set_registered_model_alias(t.model, alias, version)
            continue
        try:
            if str(client.get_model_version_by_alias(t.model, alias).version) != t.version:
                continue  # it names another version by now (a later run's challenger): not ours to remove
        except Exception:  # noqa: BLE001 - no such alias: nothing to remove
            continue
        client.delete_registered_model_alias(t.model, alias)
    if t.run_id:
        client.set_tag(t.run_id, LOGGED_TAG, p.logged)  # last: a failure before it copies again next time
    return len(p.history) - _done(logged, _started(m.canary))


def problem(m: Manifest, exc: BaseException) -> str:
    """The warning for a copy that failed (credentials redacted)."""
    t = target(m)
    return redact_uri(f"canary {m.canary.challenger.key}: could not log to MLflow at {t.uri if t else '?'} "
                      f"({type(exc).__name__}: {exc}); the manifest keeps every decision, and the next one or "
                      "`quantgate canary log MANIFEST` logs it")


class CanaryLog:
    """The gateway's copier: `submit(manifest)` after each decision written; copies run in a thread one at a
    time, and a copy waiting behind a slow one is replaced by the newer manifest (each copy is of the
    whole history, so the newest covers the older)."""

    def __init__(self, copy=sync):
        self.copy = copy
        self.copies = self.failures = 0  # finished copies, failed ones (tests wait on these)
        self.last: Manifest | None = None  # the manifest of the last copy finished, failed or not
        self._next: Manifest | None = None
        self._task: asyncio.Task | None = None

    def submit(self, m: Manifest | None) -> None:
        if target(m) is None:
            return
        self._next = m
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._next is not None:
            m, self._next = self._next, None
            try:
                await asyncio.to_thread(self.copy, m)
            except Exception as exc:  # noqa: BLE001 - MLflow down or refusing: the canary goes on
                self.failures += 1
                log.warning("%s", problem(m, exc))
            finally:
                self.copies += 1
                self.last = m

    @property
    def idle(self) -> bool:
        return self._next is None and (self._task is None or self._task.done())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
