"""Promote and rollback as pure functions of a manifest: no files, no clock, no registry.

promote(manifest, deployment, ...) puts a new active deployment in place, keeps the old one as
the first rollback target and appends to the history; it refuses a candidate that failed a gate
unless forced with a reason. rollback(manifest, ...) restores the most recent previous
deployment. The I/O around them (locking, checksums, MLflow aliases) lives in quantgate.deploy.
"""

from __future__ import annotations

from datetime import datetime

from ..errors import QuantgateError
from .manifest import CanaryEvent, Deployment, HistoryEvent, Manifest, ServingSpec

KEEP_PREVIOUS = 10


class PromotionRefused(QuantgateError):
    """A candidate failed a gate and --force was not given."""


def promote(manifest: Manifest | None, new: Deployment, *, now: datetime, by: str, reason: str = "",
            failed_gates: list[str] = (), force: bool = False, evidence: dict | None = None,
            serving: ServingSpec | None = None) -> Manifest:
    refuse_failing(new.name, failed_gates, force=force, reason=reason)
    what = "promote" + (" (forced past failing gates)" if failed_gates else "")
    event = HistoryEvent(what=what, when=now, why=reason or "passed every gate", by=by, deployment=new.key)
    if manifest is None:
        return Manifest(active=new, serving=serving or ServingSpec(), evidence=evidence or {}, history=[event])
    if manifest.active.key == new.key:
        raise QuantgateError(f"'{new.key}' is already the active deployment")
    if manifest.canary is not None and manifest.canary.running:
        raise QuantgateError(f"a canary of '{manifest.canary.challenger.key}' is running at {manifest.canary.weight:g}%: "
                             "`quantgate canary abort` it (or let it finish) before promoting another deployment")
    previous = [manifest.active] + [d for d in manifest.previous if d.key != new.key]
    serving = serving or manifest.serving
    if serving.fallback is not None and serving.fallback.key == new.key:
        serving = serving.model_copy(update={"fallback": None})
    return _validated(manifest.model_copy(update={
        "active": new,
        "previous": previous[:KEEP_PREVIOUS],
        "evidence": evidence if evidence is not None else manifest.evidence,
        "serving": serving,
        "history": [*manifest.history, event],
    }))


def refuse_failing(name: str, failed_gates: list[str], *, force: bool, reason: str) -> None:
    """PromotionRefused for a candidate that failed a gate, unless forced with a reason."""
    if failed_gates and not force:
        raise PromotionRefused(
            f"'{name}' fails {len(failed_gates)} gate(s):\n  " + "\n  ".join(failed_gates)
            + "\npromote it anyway only with --force --reason \"...\" (recorded in the history)")
    if failed_gates and force and not reason.strip():
        raise PromotionRefused("--force needs --reason \"...\": the history records why a failing candidate went live")


def rollback(manifest: Manifest, *, now: datetime, by: str, reason: str = "") -> Manifest:
    if not manifest.previous:
        raise QuantgateError("nothing to roll back to: the manifest has no previous deployment")
    target, rest = manifest.previous[0], manifest.previous[1:]
    event = HistoryEvent(what="rollback", when=now, why=reason or "manual rollback", by=by,
                         deployment=f"{manifest.active.key} -> {target.key}")
    serving = manifest.serving
    if serving.fallback is not None and serving.fallback.key == target.key:
        # rolling back onto the fallback itself: there is nothing cheaper to fall back to now
        serving = serving.model_copy(update={"fallback": None})
    canary = manifest.canary
    if canary is not None and canary.running:  # its comparison was with the deployment rolled back: it ends too
        ended = CanaryEvent(what="rollback", when=now, step=canary.step, weight=0, by=by,
                            why=f"the stable deployment {manifest.active.key} was rolled back")
        canary = canary.model_copy(update={"state": "rolled_back", "history": [*canary.history, ended]})
    return _validated(manifest.model_copy(update={"active": target, "previous": rest, "serving": serving,
                                                  "canary": canary, "history": [*manifest.history, event]}))


def _validated(m: Manifest) -> Manifest:
    """model_copy skips validation; re-check the document's invariants before anyone writes it."""
    return Manifest.model_validate(m.model_dump(by_alias=True))


SECTIONS = (("active", "active deployment"), ("previous", "rollback targets"), ("serving", "serving settings"),
            ("evidence", "evidence"))


def diff_report(a: Manifest, b: Manifest) -> list[str]:
    """`manifest diff` for people: a headline (what serves, what a rollback restores), then the
    field changes grouped by section, then the history entries that B adds."""
    lines = diff(a, b)
    if not lines:
        return []
    head = (f"active: {a.active.key} → {b.active.key}" if a.active.key != b.active.key
            else f"active: {b.active.key} (unchanged)")
    prev_a = a.previous[0].key if a.previous else "none"
    prev_b = b.previous[0].key if b.previous else "none"
    head += f"; rollback target: {prev_a} → {prev_b}" if prev_a != prev_b else f"; rollback target: {prev_b}"
    out = [head]
    for key, title in SECTIONS:
        group = [ln for ln in lines if ln.split(":", 1)[0].split(".", 1)[0] == key]
        if group:
            out += [f"{title} ({len(group)} field{'s' if len(group) != 1 else ''}):"] + [f"  {ln}" for ln in group]
    rest = [ln for ln in lines if ln.split(":", 1)[0].split(".", 1)[0] not in {k for k, _ in SECTIONS}
            and not ln.startswith("history +")]
    if rest:
        out += [f"other ({len(rest)}):"] + [f"  {ln}" for ln in rest]
    hist = [ln for ln in lines if ln.startswith("history +")]
    if hist:
        out += [f"history ({len(hist)} new):"] + [f"  {ln.removeprefix('history +: ')}" for ln in hist]
    return out


def diff(a: Manifest, b: Manifest) -> list[str]:
    """Human-readable differences between two manifests (field path: old → new)."""
    out: list[str] = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            out.append(f"{path}: {x!r} → {y!r}")

    walk(a.model_dump(mode="json", exclude={"history"}), b.model_dump(mode="json", exclude={"history"}), "")
    if len(b.history) != len(a.history):
        out += [f"history +: {e.what} {e.deployment} ({e.why})" for e in b.history[len(a.history):]]
    return out
