"""The Ray executor on a real two-node cluster (a head and one worker node on loopback, started by
.ci/ray.sh exactly as deploy/ray.md tells users): the same recipe gives the same artifacts and
metrics as the local executor, its steps spread over both nodes, and a killed worker costs its
candidate one retry, not the run.

Needs QUANTGATE_TEST_RAY_ADDRESS (HOST:PORT of the head); skipped with the reason without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantgate.recipe import load_recipe
from quantgate.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
ADDRESS = os.environ.get("QUANTGATE_TEST_RAY_ADDRESS")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not ADDRESS, reason="QUANTGATE_TEST_RAY_ADDRESS is unset: start a cluster with "
                                           "`source .ci/ray.sh && start_ray` (.ci/run does)"),
]
ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

# The two-node test checks the executor (placement, identical arithmetic, resume across executors), not a
# model: the tiny Llama built in the test (tests/conftest.py) makes its six steps take seconds each, where
# SmolLM2's GPTQ alone took 88 s a run on one thread. Baseline + RTN + GPTQ on 4 windows of 64 tokens.
TINY_RECIPE = textwrap.dedent("""\
    name: ray-smoke-tiny
    model: {{ref: {model}}}
    calibration:
      sources: [{{path: {corpus}}}]
      n_samples: 4
      seq_len: 64
    candidates:
      - {{name: base, method: baseline, dtype: float32}}
      - {{name: rtn, method: rtn, bits: 4, group_size: 32}}
      - {{name: gptq, method: gptq, bits: 4, group_size: 32, act_order: false}}
    evaluation:
      perplexity: {{path: {corpus}, seq_len: 64, max_windows: 4, batch_size: 4}}
      offline: null
      workload: null
    tracking: {{enabled: false}}
""")

# The killed-worker test needs a step that lasts long enough to be killed mid-way: GPTQ on SmolLM2.
SMOLLM2_RECIPE = textwrap.dedent("""\
    name: ray-smoke
    model: {ref: bundled:smollm2-135m-instruct, dtype: float32}
    calibration:
      sources: [{corpus: gutenberg}]
      n_samples: 4
      seq_len: 64
    candidates:
      - {name: gptq, method: gptq, bits: 4, group_size: 64, act_order: false}
    evaluation:
      perplexity: {corpus: britannica, seq_len: 64, max_windows: 4, batch_size: 4}
      offline: null
      workload: null
    tracking: {enabled: false}
""")


@pytest.fixture()
def tiny_recipe_file(tmp_path, tiny_model, corpus_file) -> Path:
    p = tmp_path / "ray-smoke-tiny.yaml"
    p.write_text(TINY_RECIPE.format(model=tiny_model, corpus=corpus_file))
    return p


@pytest.fixture()
def smollm2_recipe_file(tmp_path) -> Path:
    p = tmp_path / "ray-smoke.yaml"
    p.write_text(SMOLLM2_RECIPE)
    return p


def _quantgate(*args, **kw) -> subprocess.CompletedProcess:
    # one thread per step, as Ray gives a task with num_cpus=1: both runs then do the same arithmetic
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantgate", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800, **kw)
    sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _alive_nodes() -> set[str]:
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % ADDRESS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _outputs(recipe, ws: Workspace) -> dict:
    run_dir = ws.run_dir(recipe)
    quantized = json.loads((run_dir / "quantize.json").read_text())["results"]
    return {
        "keys": {r["name"]: r["record"]["candidate_key"] for r in quantized},
        "folders": {r["name"]: Path(r["artifact"]).name for r in quantized},
        "checksums": {r["name"]: r["record"]["checksums"] for r in quantized},
        "perplexity": {r["name"]: json.loads((run_dir / "evaluate" / f"{r['name']}.json").read_text())
                       ["metrics"]["perplexity"] for r in quantized},
        "timings": json.loads((run_dir / "timings.json").read_text())["stages"],
    }


def test_a_recipe_on_two_ray_nodes_gives_what_the_local_executor_gives(tiny_recipe_file, tmp_path):
    recipe_file = tiny_recipe_file
    recipe = load_recipe(recipe_file)
    local_ws, ray_ws = Workspace(tmp_path / "local"), Workspace(tmp_path / "ray")
    _quantgate("run", str(recipe_file), "-w", str(local_ws.root), "--device", "cpu")
    _quantgate("run", str(recipe_file), "-w", str(ray_ws.root), "--device", "cpu",
               "--executor", "ray", "--address", ADDRESS)
    local, on_ray = _outputs(recipe, local_ws), _outputs(recipe, ray_ws)

    assert on_ray["keys"] == local["keys"] and on_ray["folders"] == local["folders"]
    # with one thread each (as Ray gives num_cpus=1) the arithmetic is the same: identical files
    # (measured: identical perplexities to the last digit too)
    assert on_ray["checksums"] == local["checksums"]
    for name, ppl in local["perplexity"].items():
        assert on_ray["perplexity"][name] == pytest.approx(ppl, rel=1e-9), name
    # every step ran on the cluster, and the steps used both of its nodes
    steps = [s for s in on_ray["timings"] if s["stage"] in ("quantize", "evaluate") and s["status"] == "done"]
    assert len(steps) == 6 and all(s.get("node") for s in steps)
    assert {s["node"] for s in steps} == _alive_nodes()
    assert not any(s.get("node") for s in local["timings"])

    # resume works across executors: the same workspace run locally reuses every artifact and result
    again = _quantgate("run", str(recipe_file), "-w", str(ray_ws.root), "--device", "cpu")
    timings = json.loads((ray_ws.run_dir(recipe) / "timings.json").read_text())["stages"]
    assert [s["status"] for s in timings[len(on_ray["timings"]):] if s["stage"] == "quantize"] == ["cached"] * 3
    assert "cached" in again.stderr + again.stdout


def test_a_killed_ray_worker_costs_its_candidate_one_retry(smollm2_recipe_file, tmp_path):
    recipe_file = smollm2_recipe_file
    recipe = load_recipe(recipe_file)
    ws = Workspace(tmp_path / "ws")
    log = ws.run(recipe).log_file("gptq", "quantize")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "quantgate", "quantize", str(recipe_file), "-w", str(ws.root),
                             "--only", "gptq", "--device", "cpu", "--executor", "ray", "--address", ADDRESS],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the injected fault: each attempt writes which worker process holds it; kill the first one
        deadline = time.monotonic() + 600
        first = None
        while first is None and proc.poll() is None and time.monotonic() < deadline:
            found = re.findall(r"attempt on Ray node \S+ in worker pid (\d+)", log.read_text() if log.is_file() else "")
            first = int(found[0]) if found else None
            if first is None:
                time.sleep(0.2)  # waiting for the marker file to gain its line; nothing else to wait on
        assert first is not None, f"no attempt marker in {log} (the run exited with {proc.poll()})"
        os.kill(first, signal.SIGKILL)
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    sys.stdout.write(out[-4000:])
    assert proc.returncode == 0, out[-4000:]
    attempts = re.findall(r"attempt on Ray node \S+ in worker pid (\d+)", log.read_text())
    assert len(attempts) == 2 and int(attempts[1]) != first  # retried once, in another worker process
    (result,) = json.loads((ws.run_dir(recipe) / "quantize.json").read_text())["results"]
    assert result["status"] == "done" and (Path(result["artifact"]) / "candidate.json").is_file()
