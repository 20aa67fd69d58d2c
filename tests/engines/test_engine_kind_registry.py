"""An engine kind added through the registry alone (engine_spec.register: its Kind entry and its
format-table rows) runs the whole way: measured by the matrix, recommended by the card, promoted
into a manifest, started and answered by the gateway's supervisor — with no other file touched."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from quantgate import formats
from quantgate.engine_spec import KINDS, EngineSpec, Kind, register
from quantgate.procs import LOOPBACK, Command


def fake_command(spec: EngineSpec, served, port, python: str, host: str = LOOPBACK) -> Command:
    argv = [python, "-m", "fakeng.server", "--model", served.path, "--served-model-name", served.name,
            "--host", host, "--port", str(port), "--reply", f"fk-{spec.dtype}"]
    return Command(argv + list(spec.args), dict(spec.env), "/v1/models")


@pytest.fixture()
def fake_kind(fake_python, monkeypatch):
    rules_before = list(formats.RULES)
    register(Kind("fakeng", launched=True, provider="openai", build=fake_command, module="fakeng.server",
                  kernel_patterns=(r"starting (fakeng\S*) on",), description="a kind made in a test"),
             rules=[("fakeng", formats.ANY, formats.ANY, {}, formats.Support("yes", "fake GEMM"))])
    monkeypatch.setenv("QUANTGATE_FAKENG_PYTHON", str(fake_python))
    yield
    KINDS.pop("fakeng", None)
    formats.RULES[:] = rules_before


def _artifact(tmp_path):
    d = tmp_path / "cand"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "fake"}))
    (d / "model.safetensors").write_bytes(b"weights" * 32)
    return d


def test_a_kind_from_the_registry_goes_card_promote_supervisor(fake_kind, tmp_path):
    from quantgate.deploy import with_engine
    from quantgate.engines.card import build_card
    from quantgate.engines.pairs import run_pair
    from quantgate.engines.serving import choose
    from quantgate.engines.spec import EngineSelectionSpec, SweepSpec
    from quantgate.evaluate.loadgen import PromptSource
    from quantgate.integrity import folder_checksums
    from quantgate.serve.manifest import Deployment
    from quantgate.serve.supervision import engine_identity
    from quantgate.serve.supervisor import Supervisor
    from quantgate.workload import LengthClass, WorkloadSpec
    from quantgate.workspace import RunFolder

    folder = _artifact(tmp_path)
    art = formats.Artifact("cand", str(folder), "dense", "baseline", dtype="bfloat16")
    spec = EngineSpec(kind="fakeng", dtype="bfloat16", startup_timeout_s=30)
    sel = EngineSelectionSpec(engines={"fk": spec}, sweep=SweepSpec(levels=[1], requests_per_level=2))
    from quantgate.evaluate.regression import Case

    cases = [Case(id="own", prompt="say your name", checks=[{"type": "contains", "value": "fk-bfloat16"}]),
             Case(id="capital", prompt="capital of France?", checks=[{"type": "contains", "value": "Paris"}])]
    ctx = {"selection": sel, "run": RunFolder(tmp_path / "run"), "cost": None, "regression": (cases, 4),
           "prompts": PromptSource(["some words to cut prompts from"] * 3),
           "workload": WorkloadSpec(requests=3, concurrency=1, warmup_requests=0, timeout_s=20,
                                    mix=[LengthClass(name="s", prompt_tokens=4, output_tokens=3)])}
    cell, pair = run_pair("fk", spec, art, ctx, log=lambda m: None)
    assert cell["expected"]["status"] == "yes" and cell["observed"]["loads"] and pair["measured"]
    assert pair["kernel"] == "fakeng.server"  # read from its log by the registry's pattern
    assert pair["engine_spec"]["kind"] == "fakeng" and pair["engine_spec"]["dtype"] == "bfloat16"
    # the regression set graded on what this engine answered (its replies start with fk-bfloat16)
    assert pair["regression"]["passed"] == 1 and pair["regression"]["total"] == 2
    assert [c["passed"] for c in pair["regression"]["cases"]] == [True, False]

    card = build_card({"goal": "latency", "constraints": {"device": "cpu"}}, [cell], [pair])
    assert card["recommendation"]["recommended"] == "cand @ fk"
    choice = choose(art, card, None)
    dep = Deployment(name="cand", artifact=str(folder), files=folder_checksums(folder))
    served, evidence = with_engine(dep, choice, force=False, reason="")
    assert served.engine.kind == "fakeng" and served.provider.kind == "openai" and served.engine.argv is None
    assert evidence["source"].startswith("engine card: row 'cand @ fk'")

    async def serve():
        sup = Supervisor(tmp_path / "logs")
        try:
            e = await sup.acquire(served, wait=True)  # the health path and the probe answered
            body = json.dumps({"model": "cand", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 3}).encode()
            req = urllib.request.Request(f"{e.base_url}/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return e.status(), json.loads(r.read())
        finally:
            await sup.close()

    status, answer = asyncio.run(serve())
    assert status["state"] == "ready" and status["engine"] == "fakeng"
    assert answer["choices"][0]["message"]["content"].startswith("fk-bfloat16")  # the flag the card measured
    assert len(engine_identity(served)) == 16


def test_an_unregistered_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="'fakeng' is not an engine kind; choose one of vllm, llamacpp"):
        EngineSpec(kind="fakeng")
