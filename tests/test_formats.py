"""The one format-support table, as the go-live self-check asks it (through provider kinds)."""

from quantgate.formats import Artifact, expected, provider_support, vllm_cpu_w4a16_problem

GPTQ_ACT = Artifact("g", "/m/g", "gptq", "gptq", bits=4, group_size=128, sym=True, act_order=True)
GPTQ = Artifact("g", "/m/g", "gptq", "gptq", bits=4, group_size=128, sym=True, act_order=False)
CT = Artifact("c", "/m/c", "compressed-tensors", "gptq", bits=4, group_size=128, sym=True)


def test_the_local_provider_is_answered_by_the_transformers_rows():
    for art in (GPTQ_ACT, GPTQ, CT):
        assert provider_support("local", art, "auto") == expected("transformers", art, "cpu")
    assert provider_support("local", CT).status == "yes"  # in-process transformers dequantizes it


def test_act_order_gptq_is_refused_for_vllm_but_served_in_process():
    assert expected("vllm", GPTQ_ACT, "cuda").status == "no" and "desc_act" in expected("vllm", GPTQ_ACT).reason
    assert expected("vllm", GPTQ, "cuda").quantization == "gptq_marlin"
    assert provider_support("local", GPTQ_ACT).status == "yes"


def test_providers_without_a_checkpoint_never_pass_the_format_check():
    for kind in ("mock", "command"):
        sup = provider_support(kind, GPTQ)
        assert sup.status == "no" and kind in sup.reason


def test_vllm_cpu_w4a16_needs_avx512_on_x86():
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert "AVX-512 build only" in vllm_cpu_w4a16_problem(avx2)
    assert vllm_cpu_w4a16_problem(avx2 | {"avx512f", "avx512bw"}) is None
    assert vllm_cpu_w4a16_problem(set()) is None  # no x86 flags read (another architecture): no reason to refuse
    assert vllm_cpu_w4a16_problem({"fp", "asimd"}) is None
