from pathlib import Path

import pytest

from quantgate.errors import RecipeError
from quantgate.recipe import GPTQSpec, load_recipe

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: demo
model:
  ref: bundled:smollm2-135m-instruct
candidates:
  - name: base
    method: baseline
  - name: g4
    method: gptq
    bits: 4
    group_size: 64
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_loads_typed_candidates_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    g = r.candidate("g4")
    assert isinstance(g, GPTQSpec)
    assert (g.bits, g.group_size, g.sym, g.act_order, g.backend) == (4, 64, True, True, "gptqmodel")
    assert g.skip == ["lm_head"]
    assert r.baseline.name == "base"
    assert r.model.trust_remote_code is False and r.model.allow_pickle is False


def test_hash_ignores_formatting_and_order_but_not_settings(tmp_path):
    a = load_recipe(write(tmp_path, GOOD, "a.yaml"))
    reordered = "# a comment\ncandidates:\n  - {name: base, method: baseline}\n  - {method: gptq, name: g4, group_size: 64, bits: 4}\n" \
                "model: {ref: 'bundled:smollm2-135m-instruct'}\nname: demo\n"
    b = load_recipe(write(tmp_path, reordered, "b.yaml"))
    c = load_recipe(write(tmp_path, GOOD.replace("bits: 4", "bits: 3"), "c.yaml"))
    assert a.recipe_hash == b.recipe_hash
    assert a.recipe_hash != c.recipe_hash
    assert len(a.recipe_hash) == 64


def test_typo_names_file_line_field_and_suggests(tmp_path):
    p = write(tmp_path, GOOD.replace("    group_size: 64", "    grup_size: 64"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:10:" in msg
    assert "candidates.1.grup_size" in msg
    assert "did you mean 'group_size'" in msg


def test_unknown_method_is_named(tmp_path):
    p = write(tmp_path, GOOD.replace("method: gptq", "method: gtpq"))
    with pytest.raises(RecipeError, match=r"unknown method 'gtpq'; did you mean 'gptq'"):
        load_recipe(p)


def test_wrong_value_names_field_and_line(tmp_path):
    p = write(tmp_path, GOOD.replace("bits: 4", "bits: 5"))
    with pytest.raises(RecipeError, match=r"r.yaml:9: candidates.1.bits"):
        load_recipe(p)


def test_group_size_must_be_power_of_two_or_per_channel(tmp_path):
    with pytest.raises(RecipeError, match="group_size must be -1"):
        load_recipe(write(tmp_path, GOOD.replace("group_size: 64", "group_size: 100")))
    assert load_recipe(write(tmp_path, GOOD.replace("group_size: 64", "group_size: -1"))).candidate("g4").group_size == -1


def test_duplicate_candidate_names_refused(tmp_path):
    with pytest.raises(RecipeError, match="used twice"):
        load_recipe(write(tmp_path, GOOD.replace("name: g4", "name: base")))


def test_source_needs_exactly_one_origin(tmp_path):
    bad = GOOD + "calibration:\n  sources:\n    - {corpus: gutenberg, path: x.txt}\n"
    with pytest.raises(RecipeError, match="exactly one of 'corpus', 'path' or 'hf'"):
        load_recipe(write(tmp_path, bad))


def test_unknown_candidate_lookup_suggests(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    with pytest.raises(RecipeError, match="did you mean 'g4'"):
        r.candidate("g5")


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.name.endswith(".engines.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_parse_and_round_trip(path, tmp_path):
    r = load_recipe(path)
    again = load_recipe(write(tmp_path, r.to_yaml()))
    assert again.recipe_hash == r.recipe_hash
