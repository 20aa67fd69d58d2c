"""Child-process entry point: quantize one candidate described by a job file, write a result file.

Run by the runner as `python -m quantgate.quantize.worker JOB RESULT`; not meant for people.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import TypeAdapter

from ..isolate import child_main
from ..models import disk_size, make_config_portable
from ..recipe import CandidateSpec
from ..util import atomic_dir, atomic_write_json, sha256_file
from ..workspace import CANDIDATE_RECORD
from .base import QuantizeContext, get_quantizer


class TqdmProgress:
    def iter(self, items, label):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return items
        return tqdm(list(items), desc=label, unit="layer", leave=False)

    def log(self, msg):
        print(msg, flush=True)


def packed_modules(folder: Path) -> int:
    """Linear modules stored in a packed quantized layout (GPTQ and AWQ keep a `qweight` per module)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            n += sum(1 for k in st.keys() if k.endswith(".qweight"))
    return n


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("quantgate", "torch", "transformers", "safetensors", "gptqmodel", "llmcompressor", "compressed-tensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def peak_memory() -> dict:
    mem = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return mem


def execute(job: dict) -> dict:
    spec = TypeAdapter(CandidateSpec).validate_python(job["spec"])
    calibration = None
    if job.get("calibration_file"):
        calibration = json.loads(Path(job["calibration_file"]).read_text())["windows"]
        calibration = calibration[: getattr(spec, "n_samples", None) or len(calibration)]
    quantizer = get_quantizer(spec)
    load = job.get("load") or {}
    ctx = QuantizeContext(Path(job["source"]), calibration, job["device"], TqdmProgress(),
                          trust_remote_code=bool(load.get("trust_remote_code")),
                          allow_pickle=bool(load.get("allow_pickle")),
                          model_identity=(job["meta"].get("model") or {}).get("identity"),
                          calib_hash=job["meta"].get("calib_hash"), artifacts=Path(job["target"]).parent)
    target = Path(job["target"])
    with atomic_dir(target) as tmp:
        t0 = time.perf_counter()
        outcome = quantizer.quantize(spec, ctx, tmp)
        wall = time.perf_counter() - t0
        make_config_portable(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.suffix in (".safetensors", ".json")}
        record = {
            "name": spec.name,
            "method": spec.method,
            "params": spec.model_dump(mode="json"),
            "backend": quantizer.name,
            "format": outcome.format,
            "quantized_modules": outcome.quantized_modules or packed_modules(tmp),
            "versions": {**library_versions(), **outcome.backend_versions},
            **job["meta"],
            "device": job["device"],
            "wall_s": round(wall, 2),
            **peak_memory(),
            "size_bytes": disk_size(tmp),
            "checksums": files,
            "notes": outcome.notes,
            **outcome.record,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(tmp / CANDIDATE_RECORD, record)
    return record


if __name__ == "__main__":
    sys.exit(child_main(execute, sys.argv[1:]))
