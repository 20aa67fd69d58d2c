"""What is served is what was gated: a deployment records the dtype and kernels its evaluation ran on,
the in-process provider loads in that dtype with the evaluation's kernel rule, and promote refuses an
engine whose dtype flag differs unless forced with a reason."""

from __future__ import annotations

import pytest

from quantgate.deploy import evaluated_arithmetic, gated_arithmetic, served_arithmetic
from quantgate.kernels import arithmetic_problems
from quantgate.serve.manifest import ArithmeticSpec, Deployment
from quantgate.serve.promote import PromotionRefused

BF16 = ArithmeticSpec(dtype="bfloat16", kernels={"TorchAtenLinear": 210})
VLLM = {"kind": "vllm", "python": "/e/py", "source": "engine card: row 'gptq @ vllm', the card's recommendation"}
OPENAI = {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "gptq"}


def dep(engine=None, provider=None, evaluated=BF16) -> Deployment:
    return Deployment(name="gptq", artifact="/w/gptq", evaluated=evaluated,
                      provider=provider or ({"kind": "local"} if engine is None else OPENAI), engine=engine)


def test_the_evaluation_record_names_the_arithmetic():
    rec = {"dtype": "bfloat16", "kernels": {"TorchAtenLinear": 210}, "device": "cpu"}
    assert evaluated_arithmetic(rec) == BF16
    assert evaluated_arithmetic({"metrics": {}}) is None and evaluated_arithmetic(None) is None


def test_in_process_serving_takes_the_evaluated_dtype():
    d, differs = served_arithmetic(dep())
    assert d.provider.dtype == "bfloat16" and differs == []
    d, differs = served_arithmetic(dep(provider={"kind": "local", "dtype": "float32"}))
    assert differs == ["the in-process provider loads float32; the gates were measured in bfloat16"]


def test_an_engine_whose_dtype_differs_from_the_evaluated_one_is_refused_at_promote():
    mismatched = dep({**VLLM, "dtype": "float32"})
    with pytest.raises(PromotionRefused, match="vllm starts with --dtype float32; the gates were measured in "
                                               "bfloat16(.|\n)*--force --reason"):
        gated_arithmetic(mismatched, force=False, reason="")
    with pytest.raises(PromotionRefused, match="--force needs --reason"):
        gated_arithmetic(mismatched, force=True, reason=" ")
    d, differs = gated_arithmetic(mismatched, force=True, reason="fp32 numbers checked by hand")
    assert d.engine.dtype == "float32" and differs  # forced: served as asked, the evidence says what differs
    # a card row measured with `auto` let the engine pick: refused too
    with pytest.raises(PromotionRefused, match="--dtype auto"):
        gated_arithmetic(dep({**VLLM, "dtype": "auto"}), force=False, reason="")
    ok, differs = gated_arithmetic(dep({**VLLM, "dtype": "bfloat16"}), force=False, reason="")
    assert differs == [] and ok.engine.dtype == "bfloat16"


def test_an_engine_chosen_without_a_measured_row_starts_in_the_evaluated_dtype():
    d, differs = served_arithmetic(dep({"kind": "vllm", "python": "/e/py", "source": "--engine vllm"}))
    assert d.engine.dtype == "bfloat16" and differs == []
    # nothing to compare: a server someone else runs, or a deployment without an evaluation
    assert served_arithmetic(dep({"kind": "openai"}))[1] == []
    assert served_arithmetic(dep({**VLLM, "dtype": "float32"}, evaluated=None))[1] == []


def test_the_served_arithmetic_is_compared_with_the_evaluated_one():
    ev = {"dtype": "bfloat16", "kernels": {"TorchAtenLinear": 210}}
    assert arithmetic_problems(ev, {"dtype": "bfloat16", "kernels": {"TorchAtenLinear": 210}}) == []
    got = arithmetic_problems(ev, {"dtype": "float32", "kernels": {"TorchLinear": 210}})
    assert got == ["dtype float32 is served, the gates were measured in bfloat16",
                   "kernels TorchLinear are served, the gates were measured on TorchAtenLinear"]


def test_a_deployment_without_evaluated_dumps_as_before():
    d = Deployment(name="x", artifact="/w/x", provider={"kind": "local"})
    assert "evaluated" not in d.model_dump() and dep().model_dump()["evaluated"]["dtype"] == "bfloat16"
