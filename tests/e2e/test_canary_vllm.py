"""One canary step on the real model: the baseline promoted as the stable deployment, served by vLLM's CPU
build, a quantized candidate as the challenger (`promote --canary 50,100`), both served side by side under
`quantgate serve`; traffic from distinct users until the gateway steps the canary from 50% to 100%; no
client request failed, the candidate answered some of them, and the trace marks each request's arm and
deployment.

Where vLLM's CPU build can serve the 4-bit candidate (AVX-512, or not x86), the challenger is on vLLM
too: `quantgate engines` measures both on vLLM and promote takes each one's engine from the card. On an
AVX2-only x86 CPU (vLLM's W4A16 kernel for GPTQ/AWQ is in its AVX-512 build only; W4A16_PROBLEM says
why) the card measures the baseline alone, so promote serves the challenger in process (its default:
the local provider, transformers) beside the stable baseline on vLLM.

Reuses the session's `quantgate run` (tests/e2e/conftest.py) as test_serve_vllm.py does, and its
`quantgate engines` settings, with vLLM eager (see the test). Skipped before the shared run starts (a session
fixture listed ahead of `smollm2_run`) only where vLLM is not installed for quantgate. In the manifest
the live gates are loosened, and the stable requests a step needs to compare with and the probe set
(3 of its cases) cut down: this test is about the loop on real engines deciding a step, not about how a
4-bit SmolLM2 compares (the gates' own decisions are tests/serve/test_canary_*.py's).
"""

from __future__ import annotations

import json

import pytest
import yaml

from e2ekit import RECIPE, cli, get_json, post, start_gateway, stop_gateway, wait_until
from quantgate.formats import vllm_cpu_w4a16_problem
from quantgate.kernels import cpu_flags

# None where vLLM's CPU build serves the 4-bit challenger; else why not, and the challenger is served in process
W4A16_PROBLEM = vllm_cpu_w4a16_problem(cpu_flags())
CHALLENGER_ON_VLLM = W4A16_PROBLEM is None

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


@pytest.fixture(scope="session")
def vllm_here():
    """Session-scoped and named before smollm2_run, so it runs (and skips) before the shared run starts."""
    from quantgate.engines.available import check

    row = check("vllm")
    if not row["available"]:
        pytest.skip(f"vllm is not installed for quantgate here: {row['why']}")
    return row


def both_ready(url: str, canary: str):
    """/readyz once the stable's vLLM answers and the challenger does: its vLLM ready, or (in process) its
    weights loaded, which is when the gateway starts to route the canary arm to it."""
    code, body = get_json(f"{url}/readyz")
    engines, c = body.get("engines") or {}, body.get("canary") or {}
    ok = code == 200 and (engines.get("active") or {}).get("state") == "ready"
    if CHALLENGER_ON_VLLM:
        ok = ok and (engines.get("canary") or {}).get("state") == "ready"
    else:
        ok = ok and "canary" not in engines and c.get("serving") is True
    return body if ok and c.get("challenger", "").startswith(canary + "@") else None


def test_one_canary_step_on_vllm(vllm_here, smollm2_run, tmp_path):
    ws, run_dir = smollm2_run["ws"].root, smollm2_run["run_dir"]
    base = smollm2_run["recipe"].baseline.name
    rec = smollm2_run["compare"]["recommended"]
    cand = rec if rec not in (None, base) else "awq-w4g64"  # a quantized candidate either way
    on_vllm = [base, cand] if CHALLENGER_ON_VLLM else [base]  # the card's rows: where promote serves each
    # The recipe's engine selection with vLLM eager: its warm-up compilation costs ~85 s a start on 2 cores
    # (measured: ready in 136 s compiled vs 53 s eager) and this test starts vLLM twice (the card's
    # measurement, then under the gateway). The card keeps the argument, so promote serves what was measured.
    selection = yaml.safe_load(RECIPE.with_name("smollm2-cpu.engines.yaml").read_text())
    selection["engines"]["vllm-cpu"]["args"] = ["--enforce-eager"]
    config = tmp_path / "engines.yaml"
    config.write_text(yaml.safe_dump(selection))
    proc = cli("engines", RECIPE, "-w", ws, "--config", config, "--engine", "vllm-cpu",
               *(a for n in on_vllm for a in ("--only", n)), "--requests", "4", "--no-sweep")
    print(proc.stdout + proc.stderr[-1500:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    manifest = tmp_path / "manifest.json"
    p = cli("promote", run_dir, "--candidate", base, "--manifest", manifest, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = cli("promote", run_dir, "--candidate", cand, "--manifest", manifest, "--canary", "50,100",
            "--min-requests", "4", "--min-seconds", "0", "--probe-every", "5", timeout=600)
    print(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads(manifest.read_text())
    assert m["active"]["name"] == base and m["active"]["engine"]["kind"] == "vllm"
    challenger = m["canary"]["challenger"]
    assert challenger["name"] == cand
    assert "--enforce-eager" in m["active"]["engine"]["args"]  # the engine as measured, not as the recipe's default
    if CHALLENGER_ON_VLLM:
        assert challenger["engine"]["kind"] == "vllm", challenger
    else:  # no card row for it: promote's in-process default
        assert challenger["engine"]["kind"] == "transformers" and challenger["provider"]["kind"] == "local", challenger
    trace = tmp_path / "trace.jsonl"
    m["canary"]["gates"] = {"error_rate": 0.5, "p95_ttft_ratio": 100, "p95_e2e_ratio": 100,
                            "latency_slack_ms": 10_000, "budget_exhausted_rate": 0.5, "probe_pass_rate": 1.0}
    m["canary"]["min_fail_requests"] = 4  # stable requests to compare with before a step (default 20)
    # the gateway decides between probe rounds: a round of all 12 cases on engines sharing 2 cores takes ~40 s
    m["canary"]["probes"]["cases"] = m["canary"]["probes"]["cases"][:3]
    m["serving"]["trace"] = {"path": str(trace)}
    manifest.write_text(json.dumps(m))
    assert cli("manifest", "validate", manifest).returncode == 0

    gw, url = start_gateway(manifest, tmp_path / "serve.log")
    groups, served, failed = set(), {}, []
    try:
        body = wait_until(lambda: gw.poll() is None and both_ready(url, cand), 900, f"{base} and {cand} ready")
        groups |= {e["pid"] for e in body["engines"].values()}

        def stepped():
            c = json.loads(manifest.read_text())["canary"]
            return c if c["step"] >= 1 or c["state"] != "running" else None

        i = 0
        while not stepped():  # traffic moves a canary: distinct users until the gateway decides a step
            assert i < 400 and gw.poll() is None, f"no canary decision after {i} requests"
            try:
                # /chat takes its budget from the body (x-budget-ms is the OpenAI route's): room for two engines
                # sharing the CPU with the probe rounds; the serving default (2 s) would time some out there
                ans = post(f"{url}/chat", {"user_id": f"u{i}", "prompt": "Name a river.", "max_tokens": 8,
                                           "budget_ms": 20_000})
                served[ans["deployment"]] = served.get(ans["deployment"], 0) + 1
            except OSError as exc:  # an HTTP error status is an OSError too
                failed.append(repr(exc))
            i += 1
        c = stepped()
        assert c["state"] == "running" and c["step"] == 1, c["history"]
        step = next(e for e in c["history"] if e["what"] == "step")
        assert step["weight"] == 100 and step["by"].startswith("gateway ")
        assert step["figures"]["canary"]["requests"] >= 4 and step["figures"]["stable"]["requests"] > 0
        assert step["figures"]["canary"]["probes"].split("/")[1] != "0"  # a probe round on the real engine
        assert not failed, failed[:3]
        assert served.get(cand, 0) > 0 and served.get(base, 0) > 0, served
    finally:
        stop_gateway(gw, tmp_path / "serve.log", groups)
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    arms = {(r["arm"], r["deployment"].split("@")[0]) for r in rows if r.get("outcome") == "ok"}
    assert ("canary", cand) in arms and ("stable", base) in arms, arms
