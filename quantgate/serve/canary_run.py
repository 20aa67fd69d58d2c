"""The gateway's side of a canary: the two windows, the probes, and each decision written to the manifest.

The decisions are serve/canary.py's (pure); this is the I/O around them. Every attempt on the active
deployment of a runtime with a running canary reports here (`Runtime.observe`: the stable arm, or
the canary arm through its `CanaryView`). The stable window runs for the whole canary (it is what
the canary is compared with, and at 100% it gets no more traffic); the canary window restarts at each
step. A probe round sends every case of the manifest's regression set to both deployments directly
— no guard, no budget, no tenant is charged — and grades the answers with quantgate.grading, the
evaluation's own grader.

`tick()` decides with the gateway's wall clock; a step, a promotion or a rollback is written to the
manifest under its lock, atomically, with the figures (a restarted gateway resumes from the file at
the same step), and the gateway reloads at once. A decision taken at a step the file has already
left (a person or another replica decided first) is dropped. Replicas sharing Redis
(serving.state) take one decision per step: the first to claim it there (SET NX); the others adopt
it — figures, author and time — into their own manifest files, also while they would hold. While
Redis does not answer a replica holds rather than step or promote on its own figures (another may be
deciding otherwise); a rollback it still takes alone. Fail closed: a rollback takes the
canary's traffic away in memory before the file is written, so a manifest that cannot be written
still stops the canary here; a challenger whose provider could not be had (checksums, a start that
raised), whose engine exited, restarts, gave up, or is not ready by `ready_timeout_s` is rolled back
with that reason. Each decision written is copied to the challenger's MLflow run in a thread
(serve/canary_mlflow.py); MLflow down costs a warning, never the canary.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone

from ..grading import grade
from .canary import Decision, Window, decide, record
from .canary_mlflow import CanaryLog
from .ladder import Ladder
from .manifest import LadderSpec, edit_manifest
from .providers import GenRequest
from .providers.base import generate_within

log = logging.getLogger("quantgate.serve")


class CanaryRun:
    def __init__(self, gw):
        self.gw = gw
        self.ladder = Ladder(LadderSpec(enabled=False), gw.clock())  # the canary arm's: off (gateway._attempts)
        self.key: tuple[str, int] | None = None  # (challenger, step) the windows are about
        self.stable, self.canary = Window(), Window()
        self.since = 0.0  # clock() when this gateway first served this challenger: the readiness deadline
        self.last: Decision | None = None
        self.rounds = 0   # probe rounds completed (tests and benches wait on it)
        self._probing: asyncio.Task | None = None  # the probe round in flight: decisions do not wait for it
        self._writing = False
        self.mlflow = CanaryLog()  # each decision written is copied to the challenger's MLflow run, off the loop

    # ------------------------------------------------------------------ windows
    def configure(self, rt) -> None:
        """A new runtime is in force: keep the windows if it serves the same canary step, else restart them."""
        m = self.gw.metrics
        c = rt.canary
        if c is None:
            if self.key is not None:
                m.canary_weight.labels(*_labels(self.key[0])).set(0)
            self.key = None
            return
        key = (c.challenger.key, c.step)
        if self.key is None or self.key[0] != key[0]:
            self.stable, self.since = Window(), self.gw.clock()
        if key != self.key:
            self.canary = Window()
        self.key = key
        rt.watch = self
        m.canary_weight.labels(c.challenger.name, c.challenger.model_version).set(c.weight)

    def observe(self, arm: str, kind: str, ttft_ms: float, e2e_ms: float) -> None:
        w = self.canary if arm == "canary" else self.stable
        if kind == "ok":
            w.ok(ttft_ms, e2e_ms)
        else:
            w.failed(kind)
        self.gw.metrics.canary_attempts.labels(arm, kind).inc()

    # ------------------------------------------------------------------ decisions
    def engine_problem(self, rt) -> str | None:
        """Why the challenger cannot be trusted with traffic whatever its figures say, or None."""
        if rt.canary_failure:
            return rt.canary_failure
        engine = getattr(rt.providers.get("canary"), "engine", None)
        if engine is None:
            return None if "canary" in rt.providers and not rt.launched("canary") else "engine stopped"
        life = engine.life
        if life.state in ("restarting", "failed", "stopped") or life.restarts:
            return f"engine {life.state}" + (f": {life.error}" if life.error else "")
        if life.state == "starting" and self.gw.clock() - self.since > rt.canary.ready_timeout_s:
            return f"engine not ready after {rt.canary.ready_timeout_s:g} s"
        return None

    async def tick(self) -> Decision | None:
        """Decide now; write a step, a promotion or a rollback. None while no canary runs (or a write is on)."""
        rt = self.gw.rt
        c = rt.canary
        if c is None or self._writing:
            return None
        now = datetime.fromtimestamp(self.gw.wall(), timezone.utc)
        d = self.last = decide(c, self.stable, self.canary, now=now, engine_problem=self.engine_problem(rt))
        key, step, by = c.challenger.key, c.step, f"gateway {self.gw.replica_id}"
        # replicas sharing Redis take one decision per step: the first to claim it; the others adopt it
        step_key, state = f"{key}:{step}", self.gw.state
        if d.action == "hold":
            theirs = await state.canary_decision(step_key)
            if theirs is None:
                return d
            d, by, now = _decision(theirs)
        else:
            claimed = await state.claim_canary(step_key, _payload(d, by, now), CLAIM_TTL_S)
            if claimed is not None:
                d, by, now = _decision(claimed)
            elif d.action != "rollback":  # a rollback alone is safe: it only takes this replica's traffic away
                self.last = Decision("hold", f"{d.action} waits: the replicas' shared state does not answer",
                                     d.figures)
                log.warning("canary %s: not taking the %s alone while Redis does not answer", key, d.action)
                return self.last
        self.last = d
        if d.action == "rollback":
            rt.canary_view = None  # weight 0 now, whatever happens to the file
        self._writing = True
        try:

            def change(cur):
                if cur is None or cur.canary is None or cur.canary.challenger.key != key:
                    return None
                return record(cur, d, now=now, by=by, step=step)

            written = await asyncio.to_thread(edit_manifest, self.gw.file.path, change)
        except Exception as exc:  # noqa: BLE001 - the gateway keeps serving; the decision is retried next tick
            log.error("canary %s: could not write the decision '%s' to the manifest: %s", key, d.action, exc)
            return d
        finally:
            self._writing = False
        self.gw.metrics.canary_decisions.labels(d.action).inc()
        self.mlflow.submit(written)  # never awaited here: MLflow slow or down must not hold the canary
        log.warning("canary %s at %g%%: %s (%s)", key, c.weight, d.action, d.reason)
        await self.gw.reload_if_changed()
        return d

    async def run(self) -> None:
        """The gateway's background task: decide every eval_interval_s, probe every probes.every_s. A probe
        round runs beside the decisions (one at a time): a round of slow or timing-out probes can take
        many seconds, and a rollback the requests' windows call for must not wait for it."""
        next_probe = 0.0
        try:
            while True:
                c = self.gw.rt.canary
                await asyncio.sleep(c.eval_interval_s if c is not None else 1.0)
                try:
                    idle = self._probing is None or self._probing.done()
                    if c is not None and c.probes.cases and idle and self.gw.clock() >= next_probe:
                        next_probe = self.gw.clock() + c.probes.every_s
                        self._probing = asyncio.get_running_loop().create_task(self._probe_logged())
                    await self.tick()
                except Exception:  # noqa: BLE001 - a bug here must not end the canary's watch (nor the gateway)
                    log.exception("canary: the decision loop failed; trying again")
        finally:
            if self._probing is not None:
                self._probing.cancel()

    async def _probe_logged(self) -> None:
        try:
            await self.probe_round()
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("canary: a probe round failed")

    # ------------------------------------------------------------------ probes
    async def probe_round(self) -> None:
        """Every regression case to both deployments, graded; charged to no tenant, counted in no request metric."""
        rt = self.gw.rt
        c = rt.canary
        if c is None or rt.canary_view is None:
            return
        if not (rt.available("active") and rt.available("canary")):
            return  # an engine still starting (or restarting) fails every probe: that says nothing of its answers
        key = (c.challenger.key, c.step)
        timeout_s = rt.serving.max_budget_ms / 1000
        for case in c.probes.cases:
            for arm, role in (("stable", "active"), ("canary", "canary")):
                passed = await _probe(rt.providers[role], case, c.probes.max_tokens, timeout_s)
                if self.key != key:
                    return  # the step moved meanwhile: these verdicts belong to no window
                if not passed and not rt.available(role):
                    return  # its engine went down meanwhile: the supervisor's to judge, not its answers
                (self.canary if arm == "canary" else self.stable).probed(passed)
                self.gw.metrics.canary_probes.labels(arm, "pass" if passed else "fail").inc()
        self.rounds += 1

    def status(self) -> dict | None:
        """For /readyz."""
        c = self.gw.rt.canary
        if c is None:
            return None
        d = self.last
        return {"challenger": c.challenger.key, "step": c.step, "weight": c.weight if self.gw.rt.canary_view else 0,
                "serving": self.gw.rt.canary_view is not None, "probe_rounds": self.rounds,
                "last_decision": {"action": d.action, "reason": d.reason} if d else None}


CLAIM_TTL_S = 86_400.0  # a step's decision stays in Redis a day: replicas behind it adopt it meanwhile


def _payload(d: Decision, by: str, now: datetime) -> str:
    return json.dumps({"action": d.action, "reason": d.reason, "figures": d.figures, "by": by,
                       "when": now.isoformat()})


def _decision(payload: str) -> tuple[Decision, str, datetime]:
    x = json.loads(payload)
    return Decision(x["action"], x["reason"], x["figures"]), x["by"], datetime.fromisoformat(x["when"])


async def _probe(prov, case, max_tokens: int, timeout_s: float) -> bool:
    try:
        res = await generate_within(prov, GenRequest(case.messages(), max_tokens, temperature=0.0), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - an unanswered probe is a failed one
        return False
    return grade(case, res.text).passed


def _labels(key: str) -> tuple[str, str]:
    name, _, rest = key.partition("@")
    return name, rest.split("#", 1)[0]
