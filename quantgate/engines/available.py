"""Which engines this machine can run, and if not, why: `quantgate engines --list`.

Each launched engine is looked for in its own interpreter (spec.engine_python); the check runs
that interpreter for a moment to read the installed distribution's version, without importing
the engine itself (vLLM takes seconds to import).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

from ..engine_spec import KINDS
from .spec import EngineSelectionSpec, EngineSpec, engine_python

_PROBE = """
import importlib.metadata as md, importlib.util as u, json, sys
mod, dists = sys.argv[1], sys.argv[2].split(",")
ver = None
for d in dists:
    try:
        ver = f"{d} {md.version(d)}"; break
    except md.PackageNotFoundError:
        pass
try:
    found = u.find_spec(mod.rsplit(".", 1)[0]) is not None
except Exception:
    found = False
print(json.dumps({"version": ver, "module": found, "python": sys.version.split()[0]}))
"""


def check(kind: str, spec: EngineSpec | None = None, timeout_s: float = 60) -> dict:
    """{kind, available, python, version, why} for one engine kind."""
    k = KINDS[kind]
    if k.provider == "local":  # in process
        ok = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
        return {"kind": kind, "available": ok, "python": "this interpreter (in-process)",
                "version": _local_version("transformers") if ok else None,
                "why": None if ok else "torch/transformers are not installed: pip install 'quantgate[models]'"}
    if not k.launched:
        return {"kind": kind, "available": True, "python": None, "version": None,
                "why": "any running OpenAI-compatible server (SGLang, TGI, TensorRT-LLM, ...): give base_url"}
    module, dists, setup = k.module, k.dists, k.setup
    python, origin = engine_python(kind, spec)
    row = {"kind": kind, "available": False, "python": str(python), "origin": origin, "version": None}
    if not python.is_file():
        row["why"] = (f"no interpreter at {python} ({origin}); set QUANTGATE_{kind.upper()}_PYTHON or "
                      f"create it: {setup.format(venv=python.parent.parent)}")
        return row
    try:
        proc = subprocess.run([str(python), "-c", _PROBE, module, ",".join(dists)], capture_output=True,
                              text=True, timeout=timeout_s)
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        info = None
    if info is None:
        row["why"] = f"{python} did not run a short check; is it a working Python?"
    elif not info["module"] or not info["version"]:
        row["why"] = f"{python} (Python {info['python']}) has no {'/'.join(dists)}: {setup.format(venv='VENV')}"
    else:
        row.update(available=True, version=info["version"], why=None)
    return row


def _local_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return None


def available(selection: EngineSelectionSpec | None = None) -> list[dict]:
    """One row per engine kind (and per configured engine, when a selection is given)."""
    if selection is None:
        return [check(k) for k in KINDS]
    return [{"name": n, **check(s.kind, s)} for n, s in selection.engines.items()]
