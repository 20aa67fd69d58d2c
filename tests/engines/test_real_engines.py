"""The real engines, where this machine has them: llama.cpp's server on the GGUF the embedded
default model ships as, and vLLM on the embedded default's safetensors folder. Each engine is
looked for in its own interpreter ($QUANTGATE_LLAMACPP_PYTHON / $QUANTGATE_VLLM_PYTHON, else
$QUANTGATE_ENGINES_HOME/<kind>-venv); absent, the test is skipped and says how to set it up.
vLLM runs eager here: the test is about quantgate's command and client against the real server, and
its warm-up compilation would add ~85 s to the start on 2 cores (136 s compiled vs 53 s eager, measured)."""

from __future__ import annotations

import asyncio

import pytest

from quantgate.engines.available import check
from quantgate.procs import ServerProcess, free_port
from quantgate.engines.logs import read_log
from quantgate.engines.spec import EngineSpec, engine_python
from quantgate.formats import Artifact

pytestmark = pytest.mark.e2e


def _need(kind: str) -> None:
    row = check(kind)
    if not row["available"]:
        pytest.skip(f"{kind} is not installed for quantgate here: {row['why']}")


def _run_requests(kind: str, base_url: str, model: str, n: int = 4, concurrency: int = 2):
    from quantgate.engines.measure import client
    from quantgate.evaluate.loadgen import run_load
    from quantgate.workload import LengthClass, WorkloadSpec

    w = WorkloadSpec(requests=n, concurrency=concurrency, warmup_requests=0, timeout_s=300,
                     mix=[LengthClass(name="short", prompt_tokens=32, output_tokens=8)])

    async def go():
        async with client(kind, base_url, model, EngineSpec(kind=kind), 300) as eng:
            return await run_load(eng, w, ["The river rises in the hills to the north and runs south to the sea."])

    return asyncio.run(go())


def test_llamacpp_serves_the_bundled_gguf(tmp_path):
    _need("llamacpp")
    from quantgate.models import _bundled_file

    gguf = _bundled_file("smollm2-135m-instruct")
    spec = EngineSpec(kind="llamacpp", threads=2, max_model_len=1024)
    art = Artifact("bundled-q4_1", str(gguf), "gguf", "gguf", dtype="Q4_1")
    port = free_port()
    cmd = spec.command_on(art, str(engine_python("llamacpp")[0]), port)
    with ServerProcess("llama.cpp", cmd, port=port, log_path=tmp_path / "llama.log", startup_timeout_s=180) as srv:
        report = _run_requests("llamacpp", srv.base_url, art.name)
    assert report.aggregates.ok == 4, [r.error for r in report.records]
    assert all(r.tokens_out == 8 for r in report.records)  # min_tokens stands in for ignore_eos
    assert srv.record.stopped_by in ("sigterm", "sigkill") and srv.record.peak_rss_mb > 50
    lines = (tmp_path / "llama.log").read_text(errors="replace").splitlines()
    assert read_log("llamacpp", lines, failed=False).kernel.upper().startswith("Q4_1")


@pytest.mark.timeout(1800)
def test_vllm_serves_the_embedded_default_model(tmp_path):
    _need("vllm")
    from quantgate.models import resolve

    folder = resolve("bundled:smollm2-135m-instruct")
    spec = EngineSpec(kind="vllm", dtype="bfloat16", kv_cache_gb=1, max_model_len=1024, args=["--enforce-eager"])
    art = Artifact("smollm2", str(folder), "dense", "baseline", dtype="float32")
    port = free_port()
    cmd = spec.command_on(art, str(engine_python("vllm")[0]), port)
    with ServerProcess("vllm", cmd, port=port, log_path=tmp_path / "vllm.log", startup_timeout_s=1500) as srv:
        report = _run_requests("vllm", srv.base_url, art.name)
    assert report.aggregates.ok == 4, [r.error for r in report.records]
    assert all(r.tokens_out == 8 for r in report.records)  # vLLM honours ignore_eos
