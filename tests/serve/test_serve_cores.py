"""The core planner alone (serve/cores.py): which deployments get planned cores, the plan, and the
environment that pins them. Pure: the machine's cores are passed in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from quantgate.engine_spec import EngineSpec
from quantgate.serve.cores import CPU_BIND_ENV, allowed_cores, bind_env, cpu_bind_needed, plan


def dep(kind="vllm", device="cpu", env=None, threads=None):
    """Only what the planner reads of a deployment: its engine description."""
    return SimpleNamespace(engine=EngineSpec(kind=kind, device=device, env=env or {}, threads=threads))


def test_only_a_vllm_cpu_engine_that_does_not_pin_itself_is_planned():
    assert cpu_bind_needed(dep())
    assert not cpu_bind_needed(dep(device="cuda"))
    assert not cpu_bind_needed(dep(kind="llamacpp"))
    assert not cpu_bind_needed(dep(env={CPU_BIND_ENV: "0-3"}))  # the manifest knows better
    assert not cpu_bind_needed(SimpleNamespace(engine=None))  # mock, openai, command: no engine started


def test_the_plan_asks_the_machine_only_when_it_plans():
    def machine():
        raise AssertionError("read the allowed cores for an engine that is not pinned")

    assert plan(dep(device="cuda"), [[0]], machine) == []
    assert plan(dep(), [[0]], lambda: [0, 1]) == [1]          # green beside blue
    assert plan(dep(threads=3), [], lambda: list(range(8))) == [0, 1, 2]  # its threads, one core each


def test_the_environment_pins_the_planned_cores_or_nothing():
    assert bind_env([2, 3]) == {CPU_BIND_ENV: "2,3"}
    assert bind_env([]) == {}


def test_the_allowed_cores_are_this_process_affinity():
    cores = allowed_cores()
    assert cores and cores == sorted(cores)


@pytest.mark.parametrize("allowed, held, want, cores", [([0, 1, 2, 3], [[0, 1]], None, [2, 3]),
                                                        ([0, 1, 2, 3], [[0], [0, 1], [2]], 1, [3])])
def test_cores_no_running_engine_holds_come_first(allowed, held, want, cores):
    assert plan(dep(threads=want), held, lambda: allowed) == cores
