"""One real run of the shipped CPU recipe, shared by every e2e test: `quantgate run` as a user runs it.

Set QUANTGATE_TEST_WORKSPACE to keep the workspace between sessions (the run resumes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.workspace import Workspace
from quantgate.recipe import load_recipe

# the vLLM tests share helpers in e2ekit.py; make it importable whatever the import mode
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"


RUN_TIMEOUT_S = 3600  # the shared run's own limit (below); a test's pytest-timeout also covers its setup


def pytest_collection_modifyitems(items):
    """Whichever test first asks for the shared run pays for it in its setup, so every test that uses
    it gets at least the run's own limit (test_interop's 1800 s once timed the run out on a slow CPU)."""
    for item in items:
        if "smollm2_run" in getattr(item, "fixturenames", ()):
            mark = item.get_closest_marker("timeout")
            if mark is None or (mark.args and mark.args[0] < RUN_TIMEOUT_S):
                item.add_marker(pytest.mark.timeout(RUN_TIMEOUT_S))


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    recipe = load_recipe(RECIPE)
    root = Path(os.environ.get("QUANTGATE_TEST_WORKSPACE") or tmp_path_factory.mktemp("ws"))
    proc = subprocess.run([sys.executable, "-m", "quantgate", "run", str(RECIPE), "-w", str(root), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    sys.stdout.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    assert proc.returncode == 0, proc.stderr[-6000:]
    ws = Workspace(root)
    run_dir = ws.run_dir(recipe)
    # the run's per-stage wall times, for bench/main_job.py (QUANTGATE_TIMINGS_OUT=path keeps a copy)
    if out := os.environ.get("QUANTGATE_TIMINGS_OUT"):
        Path(out).write_text((run_dir / "timings.json").read_text())
    quantized = {r["name"]: r for r in json.loads((run_dir / "quantize.json").read_text())["results"]}
    return {"recipe": recipe, "ws": ws, "run_dir": run_dir, "stdout": proc.stdout, "stderr": proc.stderr,
            "quantized": quantized, "compare": json.loads((run_dir / "compare.json").read_text())}
