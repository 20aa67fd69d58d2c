"""The machine the matrix ran on, for the card's constraints section."""

from __future__ import annotations

import os
from pathlib import Path


def machine(device: str) -> dict:
    """The constraints section: CPU, cores, memory, GPU (nvidia-smi), network."""
    import shutil
    import subprocess

    cpu = "?"
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "?")
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().replace("\n", "; ") or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device, "cpu_model": cpu, "cores": cores, "memory_gb": mem, "gpu": gpu,
            "network": "loopback; client and server on one machine"}
