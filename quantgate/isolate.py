"""Run one unit of work (a candidate's quantization or evaluation) in a child process.

Why a process: its peak memory is the candidate's own, a native crash loses only that
candidate, and the parent keeps going. The parent writes a job file; the child writes a result
file ({"record": ...} or {"error": ...}) atomically; nothing else crosses the boundary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

from .errors import QuantgateError
from .util import atomic_write_json


def run_in_child(module: str, job: dict, workdir: Path, cwd: Path | None = None) -> dict:
    """Run `python -m module JOB RESULT`; return {"record": ...} or {"error": "..."}.

    `cwd`: where the child runs; libraries that drop files where they run (GPTQModel writes
    logs/) write them there. Paths in the job must then be absolute.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    job_file, result_file = workdir / f".job-{tag}.json", workdir / f".result-{tag}.json"
    atomic_write_json(job_file, job)
    t0 = time.time()
    env = os.environ.copy()
    # OpenMP threads that spin while waiting turn any oversubscription (GPTQModel's worker threads,
    # a busy shared machine) into a many-fold slowdown: 256-token prefill went from 1.8 s to 7.8 s
    # on a loaded 2-core box. Passive waiting costs nothing measurable when cores are free.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        proc = subprocess.run([sys.executable, "-m", module, str(job_file.resolve()), str(result_file.resolve())],
                              env=env, cwd=cwd)
    finally:
        job_file.unlink(missing_ok=True)
    if result_file.is_file():
        res = json.loads(result_file.read_text())
        result_file.unlink(missing_ok=True)
        return res
    return {"error": f"the worker process exited with code {proc.returncode} after {time.time() - t0:.0f} s "
                     "without a result (killed, out of memory, or a native crash); see the output above"}


def child_main(execute: Callable[[dict], dict], argv: list[str]) -> int:
    """The child's side: run execute(job) and write its record, or the error, to the result file."""
    job_file, result_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text())
    try:
        atomic_write_json(result_file, {"record": execute(job)})
        return 0
    except QuantgateError as exc:
        atomic_write_json(result_file, {"error": str(exc)})
    except Exception as exc:  # one failing candidate must not lose the others: report and go on
        traceback.print_exc()
        atomic_write_json(result_file, {"error": f"{type(exc).__name__}: {exc}"})
    return 1
