"""The recipe's model.trust_remote_code and model.allow_pickle reach the loaders that read the
source model (issue 10, finding 13): off by default, so a checkpoint's own code never runs and
pickle weights are never read unless the recipe says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantgate.quantize.base import QuantizeContext


def test_defaults_are_safe_and_the_recipe_turns_them_on():
    assert QuantizeContext(Path("m"), None).load_kwargs() == {"trust_remote_code": False, "use_safetensors": True}
    ctx = QuantizeContext(Path("m"), None, trust_remote_code=True, allow_pickle=True)
    assert ctx.load_kwargs() == {"trust_remote_code": True, "use_safetensors": None}


class Seen(Exception):
    pass


@pytest.mark.parametrize("remote,pickle", [(False, False), (True, True)])
def test_the_baseline_loader_is_given_them(monkeypatch, tmp_path, remote, pickle):
    import transformers

    from quantgate.quantize.baseline import BaselineQuantizer
    from quantgate.recipe import BaselineSpec

    seen = {}

    def capture(source, **kw):
        seen.update(kw)
        raise Seen

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    ctx = QuantizeContext(tmp_path, None, trust_remote_code=remote, allow_pickle=pickle)
    with pytest.raises(Seen):
        BaselineQuantizer().quantize(BaselineSpec(name="b", method="baseline", dtype="float32"), ctx, tmp_path / "out")
    assert seen["trust_remote_code"] is remote and seen["use_safetensors"] is (None if pickle else True)

