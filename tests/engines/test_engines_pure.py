"""Pure parts of engine selection: the compatibility table, command lines, log reading, the
sweep's knee and failure modes. No server, no model, no clock."""

from __future__ import annotations

import pytest

from quantgate.engines.logs import failure_in, kernels_in, oom_in, read_log
from quantgate.engines.spec import (
    EngineSelectionSpec,
    ExtraArtifactSpec,
    EngineSpec,
    SweepSpec,
    engine_python,
)
from quantgate.engines.sweep import SweepPoint, failure_modes, knee, plan, point_of
from quantgate.formats import Artifact, artifact_of_candidate, expected

DENSE = Artifact("base", "/m/base", "dense", "baseline", dtype="float32")
GPTQ4 = Artifact("g4", "/m/g4", "gptq", "gptq", bits=4, group_size=64, sym=True)
GPTQ4_ACT = Artifact("g4a", "/m/g4a", "gptq", "gptq", bits=4, group_size=64, sym=True, act_order=True)
GPTQ3 = Artifact("g3", "/m/g3", "gptq", "gptq", bits=3, group_size=64, sym=True)
AWQ4 = Artifact("a4", "/m/a4", "awq-gemm", "awq", bits=4, group_size=64, sym=False)
GGUF = Artifact("q41", "/m/x.gguf", "gguf", "gguf", dtype="Q4_1", tokenizer="/m/base", origin="extra")


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("kind,art,device,status,quant", [
    ("vllm", DENSE, "cpu", "yes", None),
    ("vllm", GPTQ4, "cpu", "yes", None),
    ("vllm", GPTQ4_ACT, "cpu", "no", None),
    ("vllm", GPTQ4_ACT, "cuda", "no", None),
    ("vllm", Artifact("pc", "/m/pc", "gptq", "gptq", bits=4, group_size=-1, sym=True, act_order=True), "cuda", "yes",
     "gptq_marlin"),
    ("vllm", GPTQ3, "cpu", "no", None),
    ("vllm", GPTQ4, "cuda", "yes", "gptq_marlin"),
    ("vllm", AWQ4, "cuda", "yes", "awq_marlin"),
    ("vllm", AWQ4, "cpu", "yes", None),
    ("vllm", GGUF, "cpu", "no", None),
    ("llamacpp", GGUF, "cpu", "yes", None),
    ("llamacpp", GPTQ4, "cpu", "no", None),
    ("transformers", GPTQ4, "cpu", "yes", None),
    ("transformers", GGUF, "cpu", "no", None),
])
def test_table_decides_per_engine_format_and_device(kind, art, device, status, quant):
    sup = expected(kind, art, device)
    assert sup.status == status and sup.quantization == quant
    assert sup.reason if status == "no" else True


def test_running_server_pairs_only_with_what_it_serves():
    assert expected("openai", GPTQ4, serves="g4").status == "yes"
    sup = expected("openai", DENSE, serves="g4")
    assert sup.status == "no" and "serves 'g4'" in sup.reason


def test_artifact_of_candidate_reads_format_bits_and_dtype():
    rec = {"method": "gptq", "format": "gptq", "params": {"bits": 4, "group_size": 64, "sym": True, "act_order": False}}
    a = artifact_of_candidate("g", "/w/g", rec, {})
    assert (a.format, a.bits, a.group_size, a.label, a.act_order) == ("gptq", 4, 64, "gptq w4g64", False)
    cfg = {"quantization_config": {"bits": 4, "group_size": 64, "sym": True, "desc_act": True}}
    assert artifact_of_candidate("g", "/w/g", rec, cfg).act_order is True  # the checkpoint's own word wins
    d = artifact_of_candidate("b", "/w/b", {"method": "baseline", "format": "dense", "params": {}},
                              {"torch_dtype": "bfloat16"})
    assert d.label == "dense bfloat16"


# --------------------------------------------------------------------------- command lines
def test_vllm_command_line_fits_the_format_and_device():
    cpu = EngineSpec(kind="vllm", dtype="bfloat16", kv_cache_gb=2, threads=2)
    c = cpu.command_on(GPTQ4, "/e/py", 8123)
    assert c.argv[:3] == ["/e/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--quantization" not in c.argv  # on CPU vLLM reads the format from the checkpoint
    assert c.argv[c.argv.index("--port") + 1] == "8123" and c.argv[c.argv.index("--host") + 1] == "127.0.0.1"
    assert c.argv[c.argv.index("--served-model-name") + 1] == "g4"
    assert c.env == {"VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2", "VLLM_USE_AOT_COMPILE": "0"}
    own = EngineSpec(kind="vllm", env={"VLLM_USE_AOT_COMPILE": "1"})  # the spec's env wins
    assert own.command_on(GPTQ4, "/e/py", 8123).env["VLLM_USE_AOT_COMPILE"] == "1"
    gpu = EngineSpec(kind="vllm", device="cuda", dtype="float16", gpu_memory_utilization=0.9, args=["--enforce-eager"])
    g = gpu.command_on(AWQ4, "/e/py", 9000)
    assert g.argv[g.argv.index("--quantization") + 1] == "awq_marlin" and g.argv[-1] == "--enforce-eager"
    assert "VLLM_CPU_KVCACHE_SPACE" not in g.env and "VLLM_USE_AOT_COMPILE" not in g.env


def test_llamacpp_command_line_keeps_streams_and_states_threads():
    c = EngineSpec(kind="llamacpp", threads=2).command_on(GGUF, "/e/py", 7000)
    a = c.argv
    assert a[1:3] == ["-m", "llama_cpp.server"] and a[a.index("--model") + 1] == "/m/x.gguf"
    assert a[a.index("--interrupt_requests") + 1] == "False"
    assert a[a.index("--n_threads") + 1] == "2" and a[a.index("--model_alias") + 1] == "q41"
    with pytest.raises(ValueError, match="not started by quantgate"):
        EngineSpec(kind="transformers").command_on(DENSE, "/e/py", 1)


def test_engine_python_comes_from_setting_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTGATE_ENGINES_HOME", str(tmp_path))
    monkeypatch.delenv("QUANTGATE_VLLM_PYTHON", raising=False)
    assert engine_python("vllm")[0] == tmp_path / "vllm-venv" / "bin" / "python"
    monkeypatch.setenv("QUANTGATE_VLLM_PYTHON", "/x/py")
    assert str(engine_python("vllm")[0]) == "/x/py"
    assert str(engine_python("vllm", EngineSpec(kind="vllm", python="/y/py"))[0]) == "/y/py"


def test_selection_spec_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="engines.x: an 'openai' engine is a running server: give base_url"):
        EngineSelectionSpec(engines={"x": {"kind": "openai"}})
    with pytest.raises(ValueError, match="'vlm' is not an engine kind.*did you mean 'vllm'"):
        EngineSpec(kind="vlm")
    with pytest.raises(ValueError, match="exactly one"):
        ExtraArtifactSpec(name="x")
    with pytest.raises(ValueError, match="exactly one"):
        ExtraArtifactSpec(name="x", gguf="a.gguf", folder="/m")
    with pytest.raises(ValueError, match="increasing"):
        SweepSpec(levels=[2, 1])
    assert EngineSelectionSpec().engines["transformers"].kind == "transformers"


# ------------------------------------------------------------------------------ log reading
VLLM_FAIL = """\
INFO 11-24 23:59:01 [utils.py:12] non-default args: {'model': '/w/g3'}
WARNING 11-24 23:59:02 [cpu.py:90] Pin memory is not supported on CPU.
(EngineCore pid=42) ERROR 11-24 23:59:09 [core.py:700] EngineCore failed to start.
Traceback (most recent call last):
  File "/v/auto_gptq.py", line 153, in __init__
    raise ValueError(
ValueError: Unsupported quantization config: bits=3, sym=True
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
""".splitlines()


def test_failure_reason_is_the_root_cause_not_a_warning_or_wrapper():
    kind, line = failure_in(VLLM_FAIL)
    assert kind == "unsupported" and line == "ValueError: Unsupported quantization config: bits=3, sym=True"


def test_llamacpp_load_failure_and_kernel_lines():
    lines = ["llama_model_load: error loading model: llama_model_loader: failed to load model from /w/g",
             "ValueError: Failed to load model from file: /w/g"]
    assert failure_in(lines)[0] == "load"
    ok = ["print_info: file format = GGUF V3 (latest)", "print_info: file type   = Q4_1",
          "llama_model_loader: - type q4_1:  169 tensors"]
    assert read_log("llamacpp", ok, failed=False).kernel == "Q4_1"


def test_vllm_kernel_names_are_read_and_deduplicated():
    lines = ["(EngineCore pid=1) INFO 11-24 00:00:00 [auto_gptq.py:352] Using CPUWNA16LinearKernel for AutoGPTQLinearMethod",
             "INFO [x] Using CPUWNA16LinearKernel for mixed-precision linear"]
    assert kernels_in("vllm", lines) == ["CPUWNA16LinearKernel"]
    assert read_log("vllm", lines, failed=False) .failure is None


def test_oom_is_recognised():
    assert oom_in(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"])
    assert failure_in(["RuntimeError: something", "std::bad_alloc"])[0] == "oom"
    assert not oom_in(["INFO all good"])


# ------------------------------------------------------------------------------------ sweep
def _pt(c, meets, ttft=100.0, tpot=20.0, **kw):
    return SweepPoint(concurrency=c, requests=6, attainment=1.0 if meets else 0.5, ttft_p50_ms=ttft,
                      tpot_p50_ms=tpot, meets=meets, **kw)


def test_knee_is_the_highest_level_meeting_slos_without_a_gap():
    assert knee([_pt(1, True), _pt(2, True), _pt(4, False)]).concurrency == 2
    assert knee([_pt(1, True), _pt(2, False), _pt(4, True)]).concurrency == 1  # a later pass is noise
    assert knee([_pt(1, False), _pt(2, True)]) is None
    assert knee([]) is None


def test_plan_and_point_of():
    assert plan([1, 2, 8]) == [(1, 6), (2, 6), (8, 24)]
    assert plan([4], 10) == [(4, 10)]
    m = {"slo_attainment": 1.0, "error_rate": 0.0, "timeout_rate": 0.0, "ttft_p95_ms": 50.0}
    assert point_of(2, 6, m, 0.95).meets
    assert not point_of(2, 6, {**m, "slo_attainment": 0.9}, 0.95).meets
    assert not point_of(2, 6, {**m, "error_rate": 0.1}, 0.95, "boom").meets


def test_failure_modes_name_queueing_contention_timeouts_and_slo_misses():
    queue = failure_modes([_pt(1, True, ttft=100), _pt(4, False, ttft=900, tpot=21)])
    kinds = {f["kind"] for f in queue}
    assert {"queueing", "slo"} <= kinds and "contention" not in kinds
    busy = failure_modes([_pt(1, True, tpot=20), _pt(4, True, ttft=150, tpot=60)])
    assert {f["kind"] for f in busy} == {"contention"}
    bad = failure_modes([], main={"timeout_rate": 0.25, "error_rate": 0.5, "first_error": "HTTP 500"},
                        oom=True, start_error=None)
    text = " ".join(f["detail"] for f in bad)
    assert "25% of requests timed out" in text and "HTTP 500" in text and bad[0]["kind"] == "oom"
    assert failure_modes([], start_error="ValueError: x")[0] == {"kind": "start", "detail": "ValueError: x"}


def test_llamacpp_client_asks_for_the_full_output_with_min_tokens():
    from quantgate.engines.measure import client
    from quantgate.evaluate.clients.base import GenerationRequest

    req = GenerationRequest("r1", [{"role": "user", "content": "hi"}], max_tokens=48)
    llama = client("llamacpp", "http://127.0.0.1:1", "m", EngineSpec(kind="llamacpp"), 5).body(req)
    vllm = client("vllm", "http://127.0.0.1:1", "m", EngineSpec(kind="vllm", extra_body={"top_k": 1}), 5).body(req)
    assert llama["min_tokens"] == 48 and llama["ignore_eos"] is True
    assert "min_tokens" not in vllm and vllm["top_k"] == 1


def test_tokenizer_is_normalized_for_the_gguf_converter():
    from quantgate.engines.artifacts import normalize_tokenizer

    tj = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"<s>": 1, "</s>": 2, "a": 3}},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}]},
          "added_tokens": [{"id": 4, "content": "<|im_end|>"}]}
    new_tj, new_tc, changes = normalize_tokenizer(tj, {"eos_token": "<s>", "bos_token": "<s>"},
                                                  {"eos_token_id": 4, "bos_token_id": 1})
    assert new_tj["model"]["byte_fallback"] is False and tj["model"]["byte_fallback"] is True  # input untouched
    assert new_tc == {"eos_token": "<|im_end|>", "bos_token": "<s>"} and len(changes) == 2
    spm = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}, "pre_tokenizer": {"type": "Metaspace"}}
    assert normalize_tokenizer(spm, {}, {})[2] == []  # a SentencePiece-style BPE keeps its byte fallback


VLLM_PYDANTIC = """\
/v/api_server.py:24: DeprecationWarning: this module is deprecated and unsupported in the future
pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig
  Value error, GPTQ group activation ordering (desc_act=True) is no longer supported. Use desc_act=False.
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
""".splitlines()


def test_pydantic_value_errors_are_read_and_python_warnings_are_not():
    kind, line = failure_in(VLLM_PYDANTIC)
    assert kind == "unsupported" and line.startswith("Value error, GPTQ group activation ordering")
    kind, line = failure_in(["UnicodeDecodeError: 'utf-8' codec can't decode byte 0xc3",
                             "OSError: It looks like the config file at '/m/x.gguf' is not a valid JSON file."])
    assert kind == "config" and line.endswith("is not a valid JSON file.")


def test_folder_format_is_read_from_its_config():
    from quantgate.formats import format_of as _format_of

    assert _format_of({}) == "dense"
    assert _format_of({"quantization_config": {"quant_method": "gptq", "checkpoint_format": "gptq_v2"}}) == "gptq_v2"
    assert _format_of({"quantization_config": {"quant_method": "awq"}}) == "awq-gemm"
