"""`quantgate run` as CI sees it (output not a terminal), on a tiny model: quantgate's own lines only."""

import json
import os
import re
import subprocess
import sys

from .conftest import REPO, write_tiny_recipe

STATE_LINE = re.compile(r"^\[(\d+)/(\d+) +\S+\] (\S+(?: test)?) +(\S+) +(queued|running|cached|done|failed|skipped)")


def tiny_recipe(tmp_path, tiny_model, corpus_file):
    return write_tiny_recipe(tmp_path, tiny_model, corpus_file, name="tiny-out", requests=2, concurrency=1)


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "quantgate", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def test_piped_run_prints_one_line_per_state_change_logs_the_backend_and_ends_with_a_summary(
        tmp_path, tiny_model, corpus_file):
    recipe = tiny_recipe(tmp_path, tiny_model, corpus_file)
    ws = tmp_path / "ws"
    proc = run_cli("run", recipe, "-w", ws, "--no-track", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out and "\x1b[" not in out  # no redraws, no colour codes in a log
    states = [m.groups() for line in out.splitlines() if (m := STATE_LINE.match(line))]
    # 2 candidates × (quantize + perplexity, regression, offline, load test): running, then done
    cells = {(c, s) for _, _, s, c, _ in states}
    assert len(cells) == 10
    assert sorted(st for *_, st in states) == ["done"] * 10 + ["running"] * 10
    assert states[-1][0] == states[-1][1] == "10"  # the counter reaches the total
    for banner in ("GPTQModel", "Failed to load", "_pytree", "GenerationConfig", "it/s]", "Traceback"):
        assert banner not in out, banner
    assert "comparison" in out.lower() or "perplexity" in out
    assert re.search(r"recommended: \S+ — ", out) and "quantgate promote " in out
    run_dir = next((ws / "runs").iterdir())
    logs = {p.name: p.read_text() for p in (run_dir / "logs").iterdir()}
    assert set(logs) == {f"{c}.{s}.log" for c in ("base", "rtn4") for s in ("quantize", "evaluate")}
    assert "baseline base: saving the source model as float32" in logs["base.quantize.log"]
    timings = json.loads((run_dir / "timings.json").read_text())["stages"]
    parts = {t["candidate"]: t["parts_s"] for t in timings if t["stage"] == "evaluate"}
    assert set(parts["rtn4"]) >= {"model_load", "perplexity", "regression", "offline", "load_test"}

    # `compare` ends like `run`: the recommendation, why, and the next command
    comp = run_cli("compare", recipe, "-w", ws, cwd=tmp_path)
    assert comp.returncode == 0 and re.search(r"recommended: \S+ — ", comp.stdout + comp.stderr)

    # a resume measures nothing again and says so, one line per step
    again = run_cli("run", recipe, "-w", ws, "--no-track", "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    states = [m.groups() for line in (again.stdout + again.stderr).splitlines() if (m := STATE_LINE.match(line))]
    assert sorted(st for *_, st in states) == ["cached"] * 10
