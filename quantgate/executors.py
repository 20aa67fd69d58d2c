"""Where each candidate's isolated steps run: this machine one after another, or a Ray cluster.

The pipeline hands an executor `Task`s — a worker module (`quantgate.quantize.worker`,
`quantgate.evaluate.worker`), its job, and where its files go — and gets back one `Outcome` per
task as each finishes. Both executors call the same isolated entry point (`isolate.run_in_child`),
so a step's result, its artifact key, its records and resume are the same wherever it ran.

- `LocalExecutor` (the default, needs no Ray): one task after another in a child process.
- `RayExecutor`: each task is a Ray task asking for its spec's resources (num_cpus, num_gpus,
  memory); inside it the same child process runs on whichever node Ray picked. Its progress
  events come back to the driver through a Ray queue, so the run's view and ETA still work; its
  log goes to the candidate's log file. A worker that dies (killed, node lost) is retried once
  by Ray (max_retries=1, system failures only); a second loss is recorded as failed, like a
  local crash. A step that fails by itself (an error in the recipe or the model) is not retried.

Every path in a job is absolute and must mean the same on every node: one machine, or a shared
filesystem mounted at the same path (deploy/ray.md).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .errors import QuantgateError
from .isolate import run_in_child

RAY_EXTRA = "pip install 'quantgate[ray]'"
MAX_RETRIES = 1  # a lost worker costs its candidate one retry, then the candidate is failed
EXECUTORS = ("local", "ray")
# the driver's settings that workers on this machine must see the same (caches, offline mode)
FORWARDED_ENV = ("QUANTGATE_", "HF_", "TRANSFORMERS_")


@dataclass
class Task:
    """One isolated step of one candidate."""

    name: str  # the candidate
    stage: str  # quantize | evaluate
    module: str  # the worker module run as `python -m MODULE JOB RESULT`
    job: dict
    workdir: Path  # where the job and result files go
    log_file: Path
    cwd: Path | None = None
    resources: dict = field(default_factory=dict)  # ray_options() for this step
    on_start: Callable[[str], None] | None = None  # called with where it runs, each attempt
    on_event: Callable[[dict], None] | None = None  # the worker's stage events (progress view)


@dataclass
class Outcome:
    result: dict  # {"record": ...} or {"error": "..."}, as run_in_child returns
    wall_s: float
    cpu_s: float | None = None  # CPU of the step's processes (what wall time hides on a busy machine)
    node: str | None = None  # the Ray node id it finished on


class Executor(Protocol):
    name: str

    def run(self, tasks: list[Task], echo: Callable[[str], None] | None = None) -> Iterator[tuple[Task, Outcome]]:
        """Run the tasks; yield each with its outcome as it finishes (any order)."""

    def close(self) -> None: ...


def children_cpu() -> float:
    """CPU seconds used by finished child processes of this process."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class LocalExecutor:
    """Today's behaviour: each task in its own child process, one after another, in order."""

    name = "local"

    def run(self, tasks, echo=None):
        for t in tasks:
            t0, c0 = time.perf_counter(), children_cpu()
            if t.on_start:
                t.on_start("local")
            got = run_in_child(t.module, t.job, t.workdir, t.cwd, log_file=t.log_file, on_event=t.on_event, echo=echo)
            yield t, Outcome(got, time.perf_counter() - t0, children_cpu() - c0)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------ pure parts
def task_resources(executor, candidate: str, stage: str):
    """The recipe's resources for one candidate's step: its own entry, else the stage's."""
    from .recipe import ExecutorSpec

    spec = executor or ExecutorSpec()
    return getattr(spec.candidates.get(candidate) or spec.resources, stage)


def ray_options(res, device: str) -> dict:
    """A TaskResourcesSpec → Ray task options. GPUs default to one per step on cuda, none on cpu."""
    num_gpus = res.num_gpus if res.num_gpus is not None else (1 if device == "cuda" else 0)
    opts = {"num_cpus": res.num_cpus, "num_gpus": num_gpus, "max_retries": MAX_RETRIES, "retry_exceptions": False}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    return opts


def choose(recipe_executor, kind: str | None, address: str | None) -> tuple[str, str | None]:
    """(executor kind, Ray address): the command line wins over the recipe; local by default."""
    kind = kind or (recipe_executor.kind if recipe_executor else "local")
    if kind not in EXECUTORS:
        raise QuantgateError(f"--executor: '{kind}' is not one of {', '.join(EXECUTORS)}")
    if address and kind != "ray":
        raise QuantgateError("--address is the Ray cluster's address; it needs --executor ray (or `executor: ray`)")
    if kind != "ray":
        return kind, None  # `--executor local` over a recipe's ray executor ignores its address
    return kind, address or (recipe_executor.address if recipe_executor else None)


def worker_env(environ=os.environ) -> dict:
    """Environment for the Ray workers: quantgate from the driver's own source folder when it is not
    an installed package (a checkout), and the driver's quantgate/Hugging Face settings."""
    import quantgate

    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV)}
    root = Path(quantgate.__file__).resolve().parents[1]
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [environ.get("PYTHONPATH")])])
    return env


def import_ray():
    try:
        import ray
    except ImportError:
        raise QuantgateError(f"the Ray executor needs Ray, which is not installed here: {RAY_EXTRA} "
                             "(on the driver and every node); the default local executor needs nothing") from None
    return ray


def make_executor(kind: str, address: str | None = None):
    return RayExecutor(address) if kind == "ray" else LocalExecutor()


# ------------------------------------------------------------------------------------ Ray
def _ray_step(module: str, job: dict, workdir: str, cwd: str | None, log_file: str, queue, index: int,
              echo: bool) -> dict:
    """The body of one Ray task, on a worker: the same child process the local executor runs."""
    import ray

    node, pid = ray.get_runtime_context().get_node_id(), os.getpid()
    log = Path(log_file)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:  # says where each attempt ran (and which process to blame)
        fh.write(f"quantgate: attempt on Ray node {node} in worker pid {pid}\n")
    queue.put((index, "start", node))
    t0, c0 = time.perf_counter(), children_cpu()
    got = run_in_child(module, job, Path(workdir), Path(cwd) if cwd else None, log_file=log,
                       on_event=lambda ev: queue.put((index, "event", ev)),
                       echo=(lambda line: queue.put((index, "echo", line))) if echo else None,
                       die_with_parent=True)
    return {"result": got, "wall_s": time.perf_counter() - t0, "cpu_s": children_cpu() - c0, "node": node}


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class RayExecutor:
    """Each task as a Ray task on an existing cluster (`address`), or on a Ray started for this run."""

    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address
        self._ray = None

    def _connect(self):
        if self._ray is not None:
            return self._ray
        import logging

        ray = import_ray()
        kwargs = {"log_to_driver": False, "logging_level": logging.WARNING,
                  "runtime_env": {"env_vars": worker_env()}}
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            kwargs["address"] = address
        else:
            kwargs["include_dashboard"] = False  # a Ray of its own, gone when the run ends
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise QuantgateError(f"cannot reach the Ray cluster at {address or '(a new local one)'}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; start one with "
                                 "`ray start --head` (deploy/ray.md) or pass --address") from None
        self._ray = ray
        return ray

    def run(self, tasks, echo=None):
        if not tasks:
            return
        ray = self._connect()
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # the workers' progress events, back to this driver
        step = ray.remote(_ray_step)
        pending = {}
        for i, t in enumerate(tasks):
            ref = step.options(name=f"quantgate {t.stage} {t.name}", **t.resources).remote(
                t.module, t.job, str(t.workdir), str(t.cwd) if t.cwd else None, str(t.log_file), queue, i,
                echo is not None)
            pending[ref] = t
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                self._relay(queue, tasks, echo)  # a finished task's events all arrived before it returned
                for ref in ready:
                    t = pending.pop(ref)
                    yield t, self._outcome(ray, ref)
        finally:
            for ref in pending:  # interrupted: nothing keeps running on the cluster for this run
                ray.cancel(ref, force=True)
            try:
                queue.shutdown()
            except Exception:  # the queue's actor may already be gone with the cluster
                pass

    @staticmethod
    def _relay(queue, tasks, echo) -> None:
        n = queue.qsize()
        for index, kind, payload in (queue.get_nowait_batch(n) if n else []):
            t = tasks[index]
            if kind == "start" and t.on_start:
                t.on_start(f"ray node {payload[:12]}")
            elif kind == "event" and t.on_event:
                t.on_event(payload)
            elif kind == "echo" and echo:
                echo(payload)

    @staticmethod
    def _outcome(ray, ref) -> Outcome:
        try:
            got = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised by quantgate's own code on the worker
            return Outcome({"error": f"the step failed on its Ray worker: {_first_line(exc)}"}, 0.0)
        except ray.exceptions.RayError as exc:  # the worker or its node was lost, on every attempt
            return Outcome({"error": f"the Ray worker running it was lost on each of {1 + MAX_RETRIES} attempts "
                                     f"({type(exc).__name__}: {_first_line(exc)}); its log says where each ran"}, 0.0)
        return Outcome(got["result"], got["wall_s"], got["cpu_s"], got["node"])

    def close(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
