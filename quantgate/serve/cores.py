"""The core planner: which CPU cores an engine the gateway starts on CPU is pinned to.

vLLM's CPU build pins its OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND=auto`), and `auto`
puts every engine on the same cores (on a 2-core machine: core 0). During a blue/green switch the
new engine would then warm up on the core the old one is serving from. So the supervisor plans the
cores of every engine whose kind names such a variable (engine_spec.Kind.cores_env), the ones no
other running engine holds first, and pins the engine's whole process tree there (procs.Command.cpus):
the threads binding alone left the new engine's API-server process free to queue behind the old
engine's busy worker, where it sat runnable with 0 CPU seconds for minutes of a switch under load.
An engine whose spec names `cores` gets exactly those.

`needed` and `plan` are pure; `allowed_cores` is the one read of the machine (this process's CPU
affinity); `bind_env` is what the engine is started with.
"""

from __future__ import annotations

import os

from .manifest import Deployment

CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU build: the cores its OpenMP threads are pinned to


def cpu_bind_needed(d: Deployment) -> bool:
    """A CPU engine whose kind pins its threads (vLLM) and whose manifest does not: the supervisor
    plans its cores (a manifest that sets the variable itself knows better and is left alone)."""
    e = d.engine
    return (e is not None and e.launched and e.device == "cpu" and e.info.cores_env is not None
            and e.info.cores_env not in e.env)


def core_plan(allowed: list[int], held: list[list[int]], want: int | None = None) -> list[int]:
    """The cores for a new CPU engine: `want` of them (default half the allowed cores, at least one,
    so the next engine of a switch finds free ones), cores no running engine holds first, then the
    least shared; sorted. `held` lists the cores of every other running engine."""
    if not allowed:
        return []
    n = max(1, min(len(allowed), want or len(allowed) // 2))
    use = {c: 0 for c in allowed}
    for cores in held:
        for c in cores:
            if c in use:
                use[c] += 1
    return sorted(sorted(allowed, key=lambda c: (use[c], c))[:n])


def plan(d: Deployment, held: list[list[int]], allowed) -> list[int]:
    """The cores to pin `d`'s new engine to, or [] when the supervisor does not pin it. `allowed` is
    called only when a plan is needed (it reads the machine: `allowed_cores`)."""
    if d.engine is not None and d.engine.cores:
        return list(d.engine.cores)
    if not cpu_bind_needed(d):
        return []
    return core_plan(allowed(), held, d.engine.threads)


def bind_env(cores: list[int]) -> dict[str, str]:
    """The environment that pins an engine to `cores` (nothing when it is not pinned)."""
    return {CPU_BIND_ENV: ",".join(map(str, cores))} if cores else {}


def allowed_cores() -> list[int]:
    """The cores this process may run on (its CPU affinity: a container's or taskset's limit)."""
    return sorted(os.sched_getaffinity(0))
