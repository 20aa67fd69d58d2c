"""The loop on the real model and vLLM's CPU build: engines → promote (engine from the card) → serve →
/chat and /v1/chat/completions answered by vLLM → rollback to the baseline on its engine while the
load generator runs → 0 failed requests → no engine process left after SIGTERM.

Reuses the session's `quantgate run` (tests/e2e/conftest.py); skipped where vLLM is not installed
for quantgate (tests/engines/test_real_engines.py finds it the same way). Only the baseline and the
recommended 4-bit candidate are measured, with a tiny workload and no sweep.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from e2ekit import RECIPE, cli, group_alive, post, serving, start_gateway, stop_gateway, wait_until
from quantgate.engines.available import check
from quantgate.formats import vllm_cpu_w4a16_problem
from quantgate.kernels import cpu_flags

# the loop switches between the baseline and a 4-bit candidate, which vLLM's CPU build serves only with
# AVX-512; on an AVX2-only CPU vLLM still serves the baseline (tests/engines/test_real_engines.py)
W4A16_PROBLEM = vllm_cpu_w4a16_problem(cpu_flags())
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400),
              pytest.mark.skipif(W4A16_PROBLEM is not None, reason=W4A16_PROBLEM or "")]

def test_promote_serve_rollback_on_vllm(smollm2_run, tmp_path):
    if not check("vllm")["available"]:
        pytest.skip(f"vllm is not installed for quantgate here: {check('vllm')['why']}")
    ws, run_dir = smollm2_run["ws"].root, smollm2_run["run_dir"]
    base = smollm2_run["recipe"].baseline.name
    rec = smollm2_run["compare"]["recommended"]
    rec = rec if rec not in (None, base) else "awq-w4g64"  # a quantized candidate to switch to either way
    proc = cli("engines", RECIPE, "-w", ws, "--engine", "vllm-cpu", "--only", base, "--only", rec,
               "--requests", "4", "--no-sweep")
    print(proc.stdout + proc.stderr[-1500:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifest = tmp_path / "manifest.json"
    for name in (base, rec):
        p = cli("promote", run_dir, "--candidate", name, "--manifest", manifest, timeout=600)
        print(p.stdout + p.stderr)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "engine: vllm" in p.stdout + p.stderr and "engine card" in p.stdout + p.stderr
    m = json.loads(manifest.read_text())
    assert m["active"]["name"] == rec and m["active"]["engine"]["kind"] == "vllm"

    gw, url = start_gateway(manifest, tmp_path / "serve.log")
    groups = set()
    try:
        body = wait_until(lambda: gw.poll() is None and serving(url, rec), 900, f"{rec} on vLLM to be ready")
        groups.add(body["engines"]["active"]["pid"])
        ans = post(f"{url}/chat", {"user_id": "u1", "prompt": "Name a river.", "max_tokens": 8})
        assert ans["deployment"] == rec and ans["text"] and ans["tokens"]["out"] > 0
        oa = post(f"{url}/v1/chat/completions", {"model": rec, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "Name a river."}]})
        assert oa["quantgate"]["deployment"] == rec and oa["usage"]["completion_tokens"] > 0

        from quantgate.evaluate.clients.openai_http import OpenAIClient
        from quantgate.evaluate.loadgen import run_load
        from quantgate.workload import LengthClass, WorkloadSpec

        records, halt = [], threading.Event()

        def load():
            w = WorkloadSpec(requests=4, concurrency=2, warmup_requests=0, timeout_s=120,
                             mix=[LengthClass(name="s", prompt_tokens=24, output_tokens=8)])

            async def once():
                async with OpenAIClient(url, rec) as eng:
                    return await run_load(eng, w, ["The river rises in the hills and runs south to the sea."])

            while not halt.is_set():
                records.extend(asyncio.run(once()).records)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        wait_until(lambda: len(records) >= 4, 300, "load before the rollback")
        rb = cli("rollback", "--manifest", manifest, "--reason", "e2e: back to the baseline", timeout=300)
        print(rb.stdout + rb.stderr)
        assert rb.returncode == 0, rb.stdout[-2000:] + rb.stderr[-2000:]
        body = wait_until(lambda: serving(url, base), 900, f"{base} on vLLM after the rollback")
        groups.add(body["engines"]["active"]["pid"])
        old = next(iter(groups - {body["engines"]["active"]["pid"]}))
        wait_until(lambda: not group_alive(old), 120, f"{rec}'s engine to stop after the switch")
        n = len(records)
        wait_until(lambda: len(records) >= n + 4, 300, "load after the rollback")
        halt.set()
        t.join(300)
        failed = [r for r in records if r.outcome != "ok"]
        assert not failed, [r.error for r in failed[:3]]
        ans = post(f"{url}/chat", {"user_id": "u1", "prompt": "Name a river.", "max_tokens": 8})
        assert ans["deployment"] == base
    finally:
        stop_gateway(gw, tmp_path / "serve.log", groups)
