"""Memory of a candidate: weights on disk, and the peak of the process that served it."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def weights_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def process_peak() -> dict:
    """Peak RSS of this process (it evaluates one candidate only), and peak CUDA memory if any."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
