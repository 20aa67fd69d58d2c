"""Pure: which engine serves which checkpoint format — the one format-support table.

    artifact format × engine (× device, × the artifact's bits / sym / act-order) → Support
    (serves yes / no / maybe, the kernel it uses, its --quantization value, why not)

The table (RULES) is data, read top to bottom, first match wins; it states what the engines'
documentation and code say. Three places ask it: the engine matrix (expected support beside what
starting the engine showed, so a wrong row surfaces as a disagreement on the card), the vLLM
command line (its --quantization value), and promotion's go-live self-check ("the engine supports
the format"), where a gateway provider kind is first mapped to the engine it runs
(PROVIDER_ENGINES). Adding an engine kind means adding its rows here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    """One servable checkpoint: a candidate's folder or a GGUF file."""

    name: str
    path: str
    format: str  # dense | gptq | gptq_v2 | awq-gemm | compressed-tensors | gguf
    method: str = ""
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    act_order: bool | None = None  # GPTQ desc_act: columns quantized in Hessian order
    dtype: str | None = None  # dense: the saved dtype; gguf: the file type (Q4_1, Q8_0, ...)
    tokenizer: str | None = None  # a folder with the tokenizer, for engines that need one apart
    origin: str = "candidate"  # candidate | extra

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def grouped(self) -> bool:
        return bool(self.group_size and self.group_size > 0)

    @property
    def label(self) -> str:
        if self.format == "gguf":
            return f"gguf {self.dtype}" if self.dtype else "gguf"
        if self.format == "dense":
            return f"dense {self.dtype}" if self.dtype else "dense"
        g = f"g{self.group_size}" if self.group_size and self.group_size > 0 else "per-channel"
        return f"{self.format} w{self.bits}{g}" if self.bits else self.format


def artifact_of_candidate(name: str, folder: str | Path, record: dict, config: dict | None = None) -> Artifact:
    """Artifact from a candidate folder, its candidate.json record (format, params) and its
    config.json (the saved dtype of a dense checkpoint)."""
    params = record.get("params") or {}
    fmt = record.get("format", "dense")
    dtype = params.get("dtype")
    if dtype is None and fmt == "dense" and config:
        dtype = config.get("torch_dtype") or config.get("dtype")
    qc = (config or {}).get("quantization_config") or {}
    act_order = qc.get("desc_act", params.get("act_order"))  # what the checkpoint says wins
    return Artifact(name=name, path=str(folder), format=fmt, method=record.get("method", params.get("method", "")),
                    bits=qc.get("bits", params.get("bits")), group_size=qc.get("group_size", params.get("group_size")),
                    sym=qc.get("sym", params.get("sym")), act_order=act_order, dtype=dtype, tokenizer=str(folder))


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Support:
    """Expected outcome of serving one format on one engine."""

    status: str  # yes | no | maybe (only trying tells)
    kernel: str | None = None
    quantization: str | None = None  # the engine's --quantization value (vLLM)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


ANY = "*"
GGUF_ONLY = ("llama.cpp reads GGUF files only; a dense folder converts with convert_hf_to_gguf.py "
             "(an extra with convert_from), GPTQ/AWQ packing has no GGUF equivalent")
DESC_ACT = ("vLLM >= 0.32 refuses GPTQ group activation ordering (desc_act with groups); quantize with "
            "act_order: false (or per-channel groups)")
# (engine, format, device, conditions on Artifact attributes, Support); first match wins. A condition
# maps an attribute to the values that match, e.g. {"bits": (4, 8), "sym": (True,)}.
RULES: list[tuple[str, str, str, dict, Support]] = [
    ("vllm", "dense", ANY, {}, Support("yes", "dense GEMM (oneDNN on CPU, cuBLAS on CUDA)")),
    ("vllm", "gptq", ANY, {"act_order": (True,), "grouped": (True,)}, Support("no", None, None, DESC_ACT)),
    ("vllm", "gptq", "cuda", {"bits": (4, 8), "sym": (True,)},
     Support("yes", "Marlin family (Machete on Hopper, Marlin on Ampere+)", "gptq_marlin")),
    ("vllm", "gptq", "cuda", {}, Support("no", None, None, "vLLM >= 0.32 serves GPTQ with Marlin-family kernels: "
                                         "4- or 8-bit symmetric only")),
    ("vllm", "gptq", "cpu", {"bits": (4,), "sym": (True,)}, Support("yes", "CPUWNA16 (W4A16)")),
    ("vllm", "gptq", "cpu", {}, Support("no", None, None, "vLLM's CPU GPTQ path (CPUWNA16) takes 4-bit "
                                        "symmetric weights only")),
    ("vllm", "gptq_v2", ANY, {}, Support("maybe", None, None, "GPTQ v2 (zero points stored as they are) is not "
                                         "a format vLLM documents; trying tells")),
    ("vllm", "awq-gemm", "cuda", {"bits": (4,)}, Support("yes", "Marlin (awq_marlin)", "awq_marlin")),
    ("vllm", "awq-gemm", "cpu", {"bits": (4,)}, Support("yes", "CPUWNA16 (W4A16)")),
    ("vllm", "awq-gemm", ANY, {}, Support("no", None, None, "vLLM's AWQ kernels take 4-bit weights only")),
    ("vllm", "compressed-tensors", "cpu", {"method": ("fp8",)}, Support("no", None, None, "FP8 needs a GPU: vLLM's "
                                         "FP8 GEMMs are CUDA kernels (Ada/Hopper; Ampere runs the weights via Marlin)")),
    ("vllm", "compressed-tensors", "cpu", {"method": ("w8a8",)}, Support("maybe", "oneDNN INT8 W8A8", None,
                                         "vLLM's CPU build runs INT8 W8A8 on x86 with AVX-512; not on an AVX2-only CPU")),
    ("vllm", "compressed-tensors", "cuda", {}, Support("yes", "compressed-tensors (Marlin/Machete)")),
    ("vllm", "compressed-tensors", "cpu", {}, Support("maybe", None, None, "CPU support depends on the scheme")),
    ("vllm", "gguf", "cuda", {}, Support("maybe", "GGUF dequant kernels (experimental)", "gguf",
                                         "vLLM's GGUF loader is experimental and CUDA-only")),
    ("vllm", "gguf", "cpu", {}, Support("no", None, None, "vLLM's GGUF kernels are CUDA-only")),
    ("llamacpp", "gguf", ANY, {}, Support("yes", "ggml")),
    ("llamacpp", ANY, ANY, {}, Support("no", None, None, GGUF_ONLY)),
    ("transformers", "dense", ANY, {}, Support("yes", "torch (eager)")),
    ("transformers", "gptq", ANY, {}, Support("yes", "GPTQModel kernel picked at load")),
    ("transformers", "gptq_v2", ANY, {}, Support("yes", "GPTQModel kernel picked at load")),
    ("transformers", "awq-gemm", ANY, {}, Support("yes", "GPTQModel AWQ kernel picked at load")),
    ("transformers", "compressed-tensors", ANY, {"method": ("w8a8", "fp8")},
     Support("yes", "compressed-tensors, emulated (weights dequantized, activations quantize-dequantized per token)")),
    ("transformers", "compressed-tensors", ANY, {}, Support("yes", "compressed-tensors (dequantized)")),
    ("transformers", "gguf", ANY, {}, Support("no", None, None, "the in-process engine loads checkpoint "
                                              "folders; transformers would dequantize a GGUF to float, "
                                              "which measures a different model")),
]


# vLLM's CPU build has its W4A16 kernel (CPUWNA16, GPTQ and AWQ) in its AVX-512 build only
VLLM_CPU_W4A16_FLAG = "avx512f"


def vllm_cpu_w4a16_problem(flags: set[str]) -> str | None:
    """Pure: why vLLM's CPU build cannot serve GPTQ/AWQ (W4A16) on an x86 CPU with these /proc/cpuinfo
    flags (kernels.cpu_flags), or None. Flags that say nothing of x86 (another architecture) are no reason."""
    if "avx2" in flags and VLLM_CPU_W4A16_FLAG not in flags:
        return ("vLLM's CPU build cannot serve GPTQ/AWQ on this CPU: its W4A16 kernel (CPUWNA16) is in the "
                "AVX-512 build only, and this CPU has AVX2 without AVX-512")
    return None


def expected(engine_kind: str, art: Artifact, device: str = "cpu", serves: str | None = None) -> Support:
    """What the table says about serving `art` on `engine_kind` on `device`."""
    if engine_kind == "openai":
        if serves is not None and serves != art.name:
            return Support("no", None, None, f"this running server serves '{serves}', not '{art.name}'")
        return Support("yes", "whatever the running server uses")
    for eng, fmt, dev, cond, sup in RULES:
        if eng != engine_kind or fmt not in (ANY, art.format) or dev not in (ANY, device):
            continue
        if all(getattr(art, attr) in values for attr, values in cond.items()):
            return sup
    return Support("maybe", None, None, f"no table row for {engine_kind} × {art.format} on {device}")


# ------------------------------------------------------------------------- formats, providers
def format_of(config: dict) -> str:
    """A folder's checkpoint format from its config.json, named as quantgate's records name it."""
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if not method:
        return "dense"
    if method == "gptq":
        return "gptq_v2" if qc.get("checkpoint_format") == "gptq_v2" else "gptq"
    if method == "awq":
        return "awq-gemm"
    return method


# the gateway's provider kinds → the engine kind of the table that does the serving
PROVIDER_ENGINES = {"local": "transformers", "openai": "openai"}


def provider_support(provider_kind: str, art: Artifact, device: str = "cpu") -> Support:
    """What the table says about a manifest provider serving `art` (mock/command serve no checkpoint)."""
    engine = PROVIDER_ENGINES.get(provider_kind)
    if engine is None:
        return Support("no", None, None, f"a '{provider_kind}' provider serves no checkpoint")
    return expected(engine, art, device if device in ("cpu", "cuda") else "cpu")
