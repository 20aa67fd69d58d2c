"""Mixed precision: the exact allocation (against brute force), the budget it must keep, the
checks before any work, the dynamic rules a checkpoint carries, and the sensitivity cache."""

from __future__ import annotations

import itertools
import json
import random
import textwrap

import pytest

from quantgate.errors import RecipeError
from quantgate import allocation as allocate
from quantgate.allocation import Linear, Plan, Unit, solve
from quantgate.recipe import load_recipe


def brute_force(costs, losses, capacity):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[i] for c, i in zip(costs, pick)) <= capacity:
            total = sum(l[i] for l, i in zip(losses, pick))
            if best is None or total < best - 1e-12:
                best = total
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_dp_finds_the_brute_force_optimum_and_keeps_the_budget(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(2, 3)
    costs = [sorted(rng.randint(1, 30) for _ in range(k)) for _ in range(n)]
    # a higher width costs more and loses less, as bits do; ties and zero gains included
    losses = [sorted((rng.choice([0.0, rng.random()]) for _ in range(k)), reverse=True) for _ in range(n)]
    capacity = rng.randint(sum(c[0] for c in costs), sum(c[-1] for c in costs))
    pick = solve(costs, losses, capacity, resolution=10_000)  # a step of 1: exact
    assert sum(c[i] for c, i in zip(costs, pick)) <= capacity
    assert sum(l[i] for l, i in zip(losses, pick)) == pytest.approx(brute_force(costs, losses, capacity))


def test_a_greedy_by_gain_per_byte_would_miss_what_the_dp_finds():
    # greedy upgrades item 0 first (gain 6 per 5 bytes beats 10 per 10) and then cannot afford item 1
    costs, losses = [[0, 5], [0, 10]], [[6.0, 0.0], [10.0, 0.0]]
    assert solve(costs, losses, 10) == [0, 1]


def test_coarse_steps_round_costs_up_so_the_budget_still_holds():
    rng = random.Random(7)
    costs = [[1000 + rng.randint(0, 99), 3000 + rng.randint(0, 999)] for _ in range(30)]
    losses = [[rng.random(), 0.0] for _ in range(30)]
    capacity = sum(c[0] for c in costs) + 20_000
    pick = solve(costs, losses, capacity, resolution=50)
    assert sum(c[i] for c, i in zip(costs, pick)) <= capacity


def test_the_allocation_is_deterministic_and_prefers_the_cheaper_choice_on_ties():
    costs, losses = [[0, 1], [0, 1], [0, 1]], [[1.0, 0.0]] * 3
    assert solve(costs, losses, 2) == solve(costs, losses, 2) == [1, 1, 0]
    assert solve([[0, 1]], [[0.0, 0.0]], 1) == [0]  # nothing to gain: no byte spent


def test_cheapest_choices_over_capacity_are_refused():
    with pytest.raises(ValueError, match="cheapest choices cost 3"):
        solve([[1, 2], [2, 3]], [[1, 0], [1, 0]], 2)


def small_plan(choices=(4, 8, 16)) -> Plan:
    linears = [Linear(f"model.layers.{i}.mlp.{n}", 64, 128) for i in range(3) for n in ("gate_proj", "up_proj")]
    return allocate.make_plan(linears, choices, 64, lambda name: False, fixed_bytes=1000)


def test_fused_linears_form_one_unit_and_the_allocation_keeps_the_size_budget():
    plan = small_plan()
    assert [u.name for u in plan.units] == [f"model.layers.{i}.mlp.gate_up_proj" for i in range(3)]
    losses = {u.name: {4: 1.0 + i, 8: 0.1, 16: 0.0} for i, u in enumerate(plan.units)}
    lo, hi = plan.size_range_mb()
    budget = lo + (hi - lo) * 0.4
    bits = allocate.allocate(plan, losses, "size_mb", budget)
    assert plan.size_bytes(bits) <= budget * 1e6
    assert bits["model.layers.2.mlp.gate_up_proj"] > 4  # the most sensitive unit got the bytes
    by_bits = allocate.allocate(plan, losses, "bits", 6.0)
    assert plan.avg_bits(by_bits) <= 6.0


def test_budgets_outside_what_the_choices_can_make_are_refused_with_the_range():
    plan = small_plan()
    lo, hi = plan.size_range_mb()
    assert f"sizes that work: {lo:.1f}–{hi:.1f} MB" in allocate.budget_problem(plan, "size_mb", lo / 2)
    assert "above" in allocate.budget_problem(plan, "size_mb", hi * 2)
    assert "4–16 bits" in allocate.budget_problem(plan, "bits", 3.5)
    assert allocate.budget_problem(plan, "bits", 4.5) is None


def test_dynamic_rules_match_the_members_and_the_fused_name_but_not_a_longer_layer_number():
    import re

    rules = allocate.dynamic_rules({"model.layers.1.self_attn.qkv_proj": 8, "model.layers.1.mlp.down_proj": 16,
                                    "model.layers.2.mlp.down_proj": 4}, default=4)
    assert len(rules) == 2
    (pos, over), (neg, empty) = rules.items()
    assert pos.startswith("+:") and over == {"bits": 8} and neg.startswith("-:") and empty == {}
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                 "model.layers.1.self_attn.qkv_proj"):  # vLLM matches the fused module's name
        assert re.match(pos[2:], name)
    assert not re.match(pos[2:], "model.layers.11.self_attn.q_proj")
    assert not re.match(neg[2:], "model.layers.10.mlp.down_proj")
    assert allocate.default_bits({"a": 4, "b": 8, "c": 8, "d": 16}) == 8


def test_predicted_sizes_match_a_packed_checkpoint(tmp_path):
    """The size model against what rtn.write_rtn really writes (4 and 8 bits, a 16-bit unit)."""
    import torch
    from safetensors.torch import save_file

    from quantgate.quantize.base import QuantizeContext
    from quantgate.quantize.mixed import source_linears
    from quantgate.quantize.rtn import write_rtn

    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(100, 64), "model.norm.weight": torch.ones(64)}
    for i in range(2):
        for n, shape in {"self_attn.q_proj": (64, 64), "mlp.down_proj": (64, 128)}.items():
            state[f"model.layers.{i}.{n}.weight"] = torch.randn(*shape)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    linears, fixed = source_linears(src)
    plan = allocate.make_plan(linears, (4, 8, 16), 32, lambda n: False, fixed)
    bits = dict(zip([u.name for u in plan.units], [4, 8, 16, 4]))
    out = tmp_path / "out"
    out.mkdir()
    ctx = QuantizeContext(src, None)
    def bits_of(name):
        b = bits[allocate.unit_name(name)]
        return None if b == 16 else b

    write_rtn(ctx, out, bits_of, 32, True, lambda ls: {}, label="t")
    actual = (out / "model.safetensors").stat().st_size
    predicted = plan.size_bytes(bits)
    assert actual <= predicted < actual * 1.05


# ----------------------------------------------------------------------------- the recipe
RECIPE = textwrap.dedent("""\
    name: mix
    model: {{ref: bundled:smollm2-135m-instruct}}
    candidates:
      - {{name: base, method: baseline}}
      - {{name: mx, method: mixed, choices: {choices}, group_size: 64, algorithm: {algorithm}, budget: {budget}}}
""")


def write(tmp_path, choices="[4, 8, 16]", algorithm="gptq", budget="{size_mb: 130}"):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.format(choices=choices, algorithm=algorithm, budget=budget))
    return p


def test_a_budget_needs_exactly_one_of_size_or_bits(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml:5: candidates.1.budget: a budget needs exactly one of 'size_mb' or 'bits'"):
        load_recipe(write(tmp_path, budget="{size_mb: 130, bits: 4.5}"))


def test_choices_the_algorithm_cannot_write_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"choices \[8\] are not widths awq can write"):
        load_recipe(write(tmp_path, choices="[4, 8, 16]", algorithm="awq"))
    with pytest.raises(RecipeError, match=r"choices \[3\] are not widths rtn can write"):
        load_recipe(write(tmp_path, choices="[3, 4]", algorithm="rtn"))


def test_a_mixed_candidate_leaves_the_other_keys_alone(tmp_path):
    from quantgate.quantize.runner import artifact_dir, candidate_key

    r = load_recipe(write(tmp_path))
    key = candidate_key(r.candidate("mx"), "model-id-1", "calib-1")
    assert artifact_dir(tmp_path, r.candidate("mx"), key).name.startswith("mixed-")
    assert key != candidate_key(load_recipe(write(tmp_path, budget="{bits: 4.5}")).candidate("mx"), "model-id-1",
                                "calib-1")


def test_validation_names_the_file_line_field_and_the_sizes_that_work(tmp_path, monkeypatch):
    from quantgate import validate

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
              "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True,
              "model_type": "llama"}
    monkeypatch.setattr(validate, "read_config", lambda *a, **k: config)
    from quantgate.documents import read_mapping

    for budget, expect in (("{size_mb: 50}", r"50 MB is below 114\.\d MB, the size with every layer at 4 bits; "
                                             r"sizes that work: 114\.\d–269\.\d MB"),
                           ("{size_mb: 900}", r"above 269\.\d MB"),
                           ("{bits: 17}", r"budgets that work: 4–16 bits")):
        p = write(tmp_path, budget=budget)
        _, root = read_mapping(p.read_text(), p)
        problems = validate.check_recipe(load_recipe(p), p, root)
        assert len(problems) == 1
        assert problems[0].startswith(f"{p}:5: candidates.1.budget.")
        assert __import__("re").search(expect, problems[0]), problems[0]
    assert validate.check_recipe(load_recipe(write(tmp_path)), None) == []


# ------------------------------------------------------------------------ the sensitivity
def test_sensitivity_is_measured_once_per_model_calibration_and_choices(tmp_path, tiny_model, monkeypatch):
    from quantgate.quantize import sensitivity
    from quantgate.quantize.base import layer_linears
    from safetensors.torch import load_file

    targets = layer_linears(load_file(str(tiny_model / "model.safetensors")))
    windows = [[(7 * i + j) % 200 + 3 for j in range(32)] for i in range(4)]
    calls = []
    real = sensitivity.measure
    monkeypatch.setattr(sensitivity, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(source=tiny_model, windows=windows, group_size=32, sym=True, targets=targets, model_id="m1",
              artifacts=tmp_path)
    first = sensitivity.cached_or_measure(choices=[4, 8, 16], calib_hash="c1", **kw)
    again = sensitivity.cached_or_measure(choices=[16, 8, 4], calib_hash="c1", **kw)
    assert len(calls) == 1 and not first["cached"] and again["cached"]
    assert again["scores"] == first["scores"]
    s = first["scores"][targets[0]]
    assert s["4"] > s["8"] > s["16"] == 0.0  # fewer bits, more predicted loss
    sensitivity.cached_or_measure(choices=[4, 8, 16], calib_hash="c2", **kw)  # another calibration
    sensitivity.cached_or_measure(choices=[2, 4, 16], calib_hash="c1", **kw)  # other choices
    assert len(calls) == 3
    assert len(list(tmp_path.glob("sensitivity-*/sensitivity.json"))) == 3


def test_a_mixed_rtn_candidate_is_a_checkpoint_that_loads_with_its_bit_map(tmp_path, tiny_model):
    """The whole quantizer on the tiny model: sensitivity, allocation, the packed checkpoint with its
    dynamic rules, and the in-process loader applying them (each linear computes what its width says)."""
    import torch
    from safetensors.torch import load_file

    from quantgate.kernels import load_causal_lm, per_module_overrides
    from quantgate.quantize.base import QuantizeContext
    from quantgate.quantize.mixed import MixedQuantizer, plan_for
    from quantgate.quantize.rtn import fake_quantize
    from quantgate.recipe import MixedSpec

    spec = MixedSpec(name="mx", method="mixed", choices=[4, 8, 16], algorithm="rtn", group_size=32,
                     budget={"bits": 8.0})
    windows = [[(5 * i + j) % 200 + 3 for j in range(32)] for i in range(4)]
    out = tmp_path / "out"
    out.mkdir()
    ctx = QuantizeContext(tiny_model, windows, model_identity="m", calib_hash="c", artifacts=tmp_path)
    outcome = MixedQuantizer().quantize(spec, ctx, out)
    mixed = outcome.record["mixed"]
    assert set(mixed["bits"].values()) > {4} and mixed["avg_bits"] <= 8.0  # something above the base width
    assert plan_for(spec, tiny_model).size_bytes(mixed["bits"]) / 1e6 == pytest.approx(mixed["size_mb"], abs=0.01)
    assert per_module_overrides(str(out)) and (out / "sensitivity.json").is_file()

    with pytest.raises(ValueError, match="evaluation.dtype: bfloat16"):
        load_causal_lm(str(out), "float32", "cpu")
    model = load_causal_lm(str(out), "bfloat16", "cpu")
    torch_kernels = [m for m in model.modules() if type(m).__name__ == "TorchLinear"]
    assert torch_kernels and all(m._cache_enabled for m in torch_kernels)  # 8-bit: dequantized once, not per call
    dense = load_file(str(tiny_model / "model.safetensors"))
    torch.manual_seed(0)
    checked = 0
    for name, mod in model.named_modules():
        if allocate.unit_name(name) not in mixed["bits"]:
            continue
        b = mixed["bits"][allocate.unit_name(name)]
        w = dense[f"{name}.weight"].float()
        assert getattr(mod, "bits", 16) == b, name
        x = torch.randn(3, w.shape[1]).bfloat16()
        with torch.no_grad():
            got = mod(x).float()
        err = {o: float((got - x.float() @ (w if o == 16 else fake_quantize(w.half(), o, 32, True).float())
                         .bfloat16().float().T).norm() / got.norm()) for o in (4, 8, 16)}
        # bfloat16 kernels (the int4 one within 2-3%): the outputs are those of its own width's weights
        assert min(err, key=err.get) == b and err[b] < 0.05, (name, b, err)
        checked += 1
    assert checked == 14  # 2 layers × 7 linears


def test_the_report_and_the_plot_show_the_bit_map(tmp_path):
    from quantgate.evaluate.report import mixed_lines
    from quantgate.plots import sensitivity_plot

    bits = {"model.layers.0.self_attn.qkv_proj": 8, "model.layers.0.mlp.down_proj": 4,
            "model.layers.1.self_attn.qkv_proj": 4, "model.layers.1.mlp.down_proj": 16}
    mixed = {"algorithm": "gptq", "budget": {"size_mb": 131}, "base_bits": 4, "bits": bits,
             "units_per_bits": {"4": 2, "8": 1, "16": 1}, "size_mb": 130.2, "avg_bits": 5.1,
             "predicted_loss_increase": 0.1, "predicted_loss_increase_all_lowest": 2.2}
    text = "\n".join(mixed_lines([{"name": "mx", "mixed": mixed}, {"name": "base"}]))
    assert "2×4-bit, 1×8-bit, 1×16-bit" in text and "`0.self_attn.qkv_proj`=8" in text
    assert "`1.mlp.down_proj`=16" in text and "`0.mlp.down_proj`" not in text
    scores = {f"model.layers.{i}.{n}": {"4": 0.01 * (i + 1), "8": 0.0001, "16": 0.0}
              for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    out = sensitivity_plot({"choices": [4, 8, 16], "scores": scores, "measure": "m", "windows": 8}, bits,
                           tmp_path / "s.png")
    assert out and out.stat().st_size > 1000
