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


DIE_WITH_PARENT = "QUANTGATE_DIE_WITH_PARENT"  # the parent's pid: the child ends when that process does


def run_in_child(module: str, job: dict, workdir: Path, cwd: Path | None = None, *, log_file: Path | None = None,
                 on_event: Callable[[dict], None] | None = None, echo: Callable[[str], None] | None = None,
                 die_with_parent: bool = False) -> dict:
    """Run `python -m module JOB RESULT`; return {"record": ...} or {"error": "..."}.

    `cwd`: where the child runs; libraries that drop files where they run (GPTQModel writes
    logs/) write them there. Paths in the job must then be absolute.
    `log_file`: every line the child prints (its libraries' banners, warnings, progress bars) goes
    there instead of the console; its stage markers go to `on_event`; `echo` (--verbose) also gets
    each line that is not known noise. Without a log file the child shares the console.
    `die_with_parent`: the child is killed when this process dies (Linux), so a retried step never
    races an orphan of its lost attempt (the Ray executor's workers use it).
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
    if die_with_parent:
        env[DIE_WITH_PARENT] = str(os.getpid())
    cmd = [sys.executable, "-m", module, str(job_file.resolve()), str(result_file.resolve())]
    try:
        if log_file is None:
            proc = subprocess.run(cmd, env=env, cwd=cwd)
        else:
            proc = _run_logged(cmd, env, cwd, Path(log_file), on_event, echo)
    finally:
        job_file.unlink(missing_ok=True)
    if result_file.is_file():
        res = json.loads(result_file.read_text())
        result_file.unlink(missing_ok=True)
        return res
    where = f"its output is in {log_file}" if log_file else "see the output above"
    return {"error": f"the worker process exited with code {proc.returncode} after {time.time() - t0:.0f} s "
                     f"without a result (killed, out of memory, or a native crash); {where}"}


def _run_logged(cmd, env, cwd, log_file: Path, on_event, echo) -> subprocess.CompletedProcess:
    from .progress import is_noise, parse_event

    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**env, "PYTHONUNBUFFERED": "1"}  # lines arrive as they are printed, in order
    with open(log_file, "a", encoding="utf-8", errors="replace") as log, \
            subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            ev = parse_event(line)
            if ev is not None:
                if on_event:
                    on_event(ev)
                continue
            log.write(line)
            if echo and not is_noise(line):
                echo(line.rstrip("\n").split("\r")[-1])
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode)


def child_main(execute: Callable[[dict], dict], argv: list[str]) -> int:
    """The child's side: run execute(job) and write its record, or the error, to the result file."""
    _follow_parent()
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


def _follow_parent() -> None:
    """Ask Linux to kill this child when its parent dies (PR_SET_PDEATHSIG), when the parent asked."""
    parent = os.environ.pop(DIE_WITH_PARENT, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before the line above: nobody waits for us
        os._exit(1)
