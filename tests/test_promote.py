"""Promote and rollback: pure functions, a crash mid-write, and concurrent promotes."""

import json
import multiprocessing as mp
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from quantgate.deploy import edit_manifest, verify
from quantgate.errors import QuantgateError
from quantgate.serve.manifest import Deployment, load_manifest, write_manifest
from quantgate.serve.promote import PromotionRefused, diff, diff_report, promote, rollback

NOW = datetime(2026, 11, 24, tzinfo=timezone.utc)


def dep(name, version="1"):
    return Deployment(name=name, model_version=version, method="gptq")


def test_first_promotion_creates_the_manifest():
    m = promote(None, dep("gptq4"), now=NOW, by="ana")
    assert m.active.name == "gptq4" and m.previous == [] and m.history[0].what == "promote"
    assert m.history[0].by == "ana" and m.history[0].why == "passed every gate"


def test_promote_then_rollback_restores_the_previous_deployment():
    m1 = promote(None, dep("base"), now=NOW, by="a")
    m2 = promote(m1, dep("gptq4"), now=NOW, by="a", reason="cheaper")
    assert m2.active.name == "gptq4" and [d.name for d in m2.previous] == ["base"]
    m3 = rollback(m2, now=NOW, by="b", reason="p95 regression")
    assert m3.active == m1.active and m3.previous == []
    assert [e.what for e in m3.history] == ["promote", "promote", "rollback"]
    assert m3.history[-1].deployment == "gptq4@1 -> base@1"
    with pytest.raises(QuantgateError, match="nothing to roll back to"):
        rollback(m3, now=NOW, by="b")


def test_failing_gate_refused_with_reasons_unless_forced_with_reason():
    failed = ["perplexity recovery 0.812 (20.9 vs baseline 17) < 0.85, short by 0.038"]
    with pytest.raises(PromotionRefused, match="short by 0.038"):
        promote(None, dep("rtn4"), now=NOW, by="a", failed_gates=failed)
    with pytest.raises(PromotionRefused, match="needs --reason"):
        promote(None, dep("rtn4"), now=NOW, by="a", failed_gates=failed, force=True)
    m = promote(None, dep("rtn4"), now=NOW, by="a", failed_gates=failed, force=True, reason="incident 42")
    assert m.history[-1].what.startswith("promote (forced") and m.history[-1].why == "incident 42"


def test_promoting_the_active_deployment_is_refused_and_diff_reads():
    m = promote(None, dep("base"), now=NOW, by="a")
    with pytest.raises(QuantgateError, match="already the active"):
        promote(m, dep("base"), now=NOW, by="a")
    m2 = promote(m, dep("gptq4", "2"), now=NOW, by="a")
    lines = diff(m, m2)
    assert "active.name: 'base' → 'gptq4'" in lines and any(l.startswith("history +: promote gptq4@2") for l in lines)
    report = diff_report(m, m2)
    assert report[0] == "active: base@1 → gptq4@2; rollback target: none → base@1"
    assert "active deployment (" in report[1] and "  active.name: 'base' → 'gptq4'" in report
    assert any(r.startswith("rollback targets (") for r in report) and report[-2].startswith("history (1 new)")
    assert diff_report(m2, m2) == []


def test_verify_refuses_changed_weights(tmp_path):
    from quantgate.integrity import weights_sha256

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    d = Deployment(name="x", artifact=str(tmp_path / "m"), sha256=weights_sha256(tmp_path / "m"))
    verify(d)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(QuantgateError, match="checksum mismatch"):
        verify(d)


WRITER = r"""
import sys
from datetime import datetime, timezone
from quantgate.serve.manifest import Deployment, HistoryEvent, Manifest, write_manifest
path = sys.argv[1]
history = [HistoryEvent(what="promote", why="x" * 2000, by="w", deployment=f"d{i}") for i in range(300)]
docs = [Manifest(active=Deployment(name=n), history=history) for n in ("old", "new")]
print("ready", flush=True)
i = 0
while True:
    write_manifest(path, docs[i % 2]); i += 1
"""


def test_killed_writer_leaves_old_or_new_manifest_never_a_torn_one(tmp_path):
    path = tmp_path / "manifest.json"
    write_manifest(path, promote(None, dep("old"), now=NOW, by="a"))
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"  # it is writing in a loop from here on
        proc.kill()
        proc.wait()
        m = load_manifest(path)
        assert m.active.name in ("old", "new")
        assert len(m.history) in (1, 300)


def _promote_many(path, prefix, n):
    for i in range(n):
        edit_manifest(path, lambda cur, i=i: promote(cur, dep(f"{prefix}{i}"), now=NOW, by=prefix))


def test_concurrent_promotes_end_with_one_consistent_history(tmp_path):
    path = tmp_path / "manifest.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_promote_many, args=(path, p, 8)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    m = load_manifest(path)
    assert len(m.history) == 16
    promoted = [e.deployment for e in m.history]
    assert sorted(promoted) == sorted(f"{p}{i}@1" for p in "ab" for i in range(8))
    # the chain is consistent: the active one is the last promoted, previous is the one before
    assert m.active.key == promoted[-1] and m.previous[0].key == promoted[-2]
    json.loads(path.read_text())


def test_rolling_back_onto_the_fallback_drops_the_fallback_and_stays_valid():
    from quantgate.serve.manifest import ServingSpec

    base = dep("base")
    m1 = promote(None, base, now=NOW, by="a")
    m2 = promote(m1, dep("gptq4"), now=NOW, by="a", serving=ServingSpec(fallback=base))
    assert m2.serving.fallback.key == base.key
    m3 = rollback(m2, now=NOW, by="a")
    assert m3.active.key == base.key and m3.serving.fallback is None
