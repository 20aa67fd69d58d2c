"""The executor interface with the local executor (real child processes), and the pure parts of the
Ray executor: resources from the recipe, which executor a command gets, the missing-extra message,
and the executor staying out of every hash. The Ray cluster itself: tests/e2e/test_ray_executor.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantgate.errors import QuantgateError
from quantgate.executors import (LocalExecutor, Task, choose, import_ray, make_executor, ray_options, task_resources,
                                 worker_env)
from quantgate.recipe import Recipe

WORKER = '''
import os, sys, time
from pathlib import Path
from quantgate.isolate import child_main
from quantgate.progress import emit

def execute(job):
    if job.get("pid_file"):
        Path(job["pid_file"]).write_text(str(os.getpid()))
        time.sleep(600)  # held until its parent dies (the test kills the parent)
    if job.get("fail"):
        raise ValueError("bad candidate")
    emit("perplexity", "running")
    print("a line for the log")
    return {"echo": job["value"], "pid": os.getpid()}

if __name__ == "__main__":
    sys.exit(child_main(execute, sys.argv[1:]))
'''


@pytest.fixture
def worker_module(tmp_path, monkeypatch):
    (tmp_path / "qg_test_worker.py").write_text(WORKER)
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(repo)]))
    return "qg_test_worker"


def test_the_local_executor_runs_each_task_in_its_own_process_in_order(worker_module, tmp_path):
    seen = []
    tasks = [Task(name, "evaluate", worker_module, {"value": name, "fail": name == "b"}, tmp_path / "work",
                  tmp_path / "logs" / f"{name}.log", on_start=lambda where, n=name: seen.append(("start", n, where)),
                  on_event=lambda ev, n=name: seen.append(("event", n, ev["stage"], ev["state"])))
             for name in ("a", "b", "c")]
    with make_executor("local") as ex:
        got = list(ex.run(tasks))
    assert [t.name for t, _ in got] == ["a", "b", "c"]
    a, b, c = (o for _, o in got)
    assert a.result["record"]["echo"] == "a" and c.result["record"]["echo"] == "c"
    assert a.result["record"]["pid"] != os.getpid() and a.result["record"]["pid"] != c.result["record"]["pid"]
    assert b.result == {"error": "ValueError: bad candidate"}  # one failing task does not stop the others
    assert a.node is None and a.cpu_s is not None
    assert ("start", "a", "local") in seen and ("event", "a", "perplexity", "running") in seen
    assert seen.index(("start", "b", "local")) > seen.index(("event", "a", "perplexity", "running"))
    assert "a line for the log" in (tmp_path / "logs" / "a.log").read_text()


def test_a_child_asked_to_die_with_its_parent_ends_when_the_parent_is_killed(worker_module, tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from quantgate.isolate import run_in_child
        run_in_child({worker_module!r}, {{"value": 1, "pid_file": {str(pid_file)!r}}}, Path({str(tmp_path / "w")!r}),
                     log_file=Path({str(tmp_path / "parent.log")!r}), die_with_parent=True)
    """)])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the child writes its pid once it runs
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel delivers SIGKILL to the orphan; init reaps it
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------- pure parts
def _recipe(**executor) -> Recipe:
    doc = {"name": "r", "candidates": [{"name": "base", "method": "baseline"},
                                       {"name": "g", "method": "gptq", "bits": 4, "group_size": 64}]}
    if executor:
        doc["executor"] = executor
    return Recipe.model_validate(doc)


def test_resources_come_from_the_recipe_with_defaults_by_device():
    r = _recipe(kind="ray", resources={"evaluate": {"num_cpus": 2, "memory_gb": 1.5}},
                candidates={"g": {"quantize": {"num_cpus": 4, "num_gpus": 0.5}}})
    assert ray_options(task_resources(r.executor, "base", "quantize"), "cpu") == \
        {"num_cpus": 1, "num_gpus": 0, "max_retries": 1, "retry_exceptions": False}
    assert ray_options(task_resources(r.executor, "base", "quantize"), "cuda")["num_gpus"] == 1
    assert ray_options(task_resources(r.executor, "base", "evaluate"), "cpu")["memory"] == int(1.5 * 2**30)
    g = ray_options(task_resources(r.executor, "g", "quantize"), "cuda")
    assert (g["num_cpus"], g["num_gpus"]) == (4, 0.5)
    # a recipe without `executor:` gets the defaults
    assert ray_options(task_resources(None, "g", "evaluate"), "cpu")["num_cpus"] == 1


def test_the_command_line_chooses_over_the_recipe_and_local_is_the_default():
    assert choose(None, None, None) == ("local", None)
    assert choose(_recipe(kind="ray", address="auto").executor, None, None) == ("ray", "auto")
    assert choose(_recipe(kind="ray", address="auto").executor, "local", None) == ("local", None)
    assert choose(None, "ray", "127.0.0.1:6379") == ("ray", "127.0.0.1:6379")
    with pytest.raises(QuantgateError, match="not one of local, ray"):
        choose(None, "dask", None)
    with pytest.raises(QuantgateError, match="needs --executor ray"):
        choose(None, None, "127.0.0.1:6379")
    assert isinstance(make_executor("local"), LocalExecutor)


def test_without_the_extra_the_message_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(QuantgateError, match=r"pip install 'quantgate\[ray\]'"):
        import_ray()
    with pytest.raises(QuantgateError, match=r"pip install 'quantgate\[ray\]'"):
        list(make_executor("ray").run([Task("a", "quantize", "m", {}, Path("."), Path("l"))]))


def test_workers_import_this_checkout_and_see_the_drivers_settings():
    env = worker_env({"QUANTGATE_WORKSPACE": "/w", "HF_HUB_OFFLINE": "1", "HOME": "/root", "PYTHONPATH": "/x"})
    assert env["QUANTGATE_WORKSPACE"] == "/w" and env["HF_HUB_OFFLINE"] == "1" and "HOME" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(Path(__file__).resolve().parents[1]), "/x"]


def test_the_executor_is_in_no_hash_and_an_absent_one_changes_no_dump():
    plain = _recipe()
    for executor in ({"kind": "ray"}, {"kind": "ray", "address": "auto", "resources": {"quantize": {"num_gpus": 1}}}):
        assert _recipe(**executor).recipe_hash == plain.recipe_hash
    assert "executor" not in plain.model_dump(mode="json") and "executor" not in plain.to_yaml()
    shorthand = Recipe.model_validate({**json.loads(plain.model_dump_json()), "executor": "ray"})
    assert shorthand.executor.kind == "ray"


def test_a_per_candidate_entry_must_name_a_candidate():
    with pytest.raises(ValueError, match="executor.candidates names 'gg'.*did you mean 'g'"):
        _recipe(kind="ray", candidates={"gg": {}})
