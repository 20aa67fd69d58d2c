"""Artifact and evaluation-cache keys are pinned: an existing workspace must resume without
recomputing after a refactor. If a key changes on purpose (a new setting that changes what is
produced), update the pin in the same commit and say why."""

import textwrap

from quantgate.pipeline import eval_key
from quantgate.quantize.runner import artifact_dir, candidate_key
from quantgate.recipe import load_recipe

RECIPE = textwrap.dedent("""\
    name: pinned
    model:
      ref: bundled:smollm2-135m-instruct
    candidates:
      - {name: base, method: baseline}
      - {name: r4, method: rtn, bits: 4, group_size: 64}
      - {name: g4, method: gptq, bits: 4, group_size: 128, act_order: false}
      - {name: a4, method: awq, bits: 4, n_samples: 16}
""")

# Evaluation keys moved on purpose when evaluation got one declared dtype (Recipe.evaluation_dtype):
# a record made before was scored in its checkpoint's own dtype (GPTQ bfloat16, RTN float16) and
# must not be reused as if scored in the declared one. Recipe hash and artifact keys did not move.
PINNED = {  # candidate: (artifact key, evaluation key)
    "base": ("701dbf615f20777596fe92c4eb863c22df7c6ecb6cd7657bcc670983f15723a5",
             "bdbad2b92570c508d13c3ad700c3d189978508c66eb42ca1fc41c27e2583684f"),
    "r4": ("15e6e554601d0f4b633cca08d9b6c37a57436fe083a472f1a9affd469d7b27a2",
           "0c7a392591408935347d39a615e8323f4f35b0a49069c95d0c1c8902dd824084"),
    "g4": ("3bd92a587108e40725fcaba7711cb1e09b1fa234ca5e488617357beab0be254c",
           "e6350d276bac59cf9c99a7ce13b2c59757720e102cd93d405986293df1c19911"),
    "a4": ("f72d781305de7bd346b6650e3e54d4b72230cc1b420674753983605d5fb789fc",
           "9b6cf9fa853c5ead854ca4b18d3a17c107c1e747c0fc4e8cdab2f2cb3968cee0"),
}


def test_artifact_and_evaluation_keys_of_a_fixed_recipe_do_not_move(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    r = load_recipe(p)
    assert r.recipe_hash == "bd1cce5003a4d05152a10e89a1de1d16d8e72428cc245a1503d15bf7b1460468"
    got = {}
    for c in r.candidates:
        key = candidate_key(c, "model-id-1", "calib-1")
        got[c.name] = (key, eval_key(r, c, {"candidate_key": key}))
    assert got == PINNED
    assert artifact_dir(tmp_path, r.candidate("g4"), PINNED["g4"][0]).name == "gptq-3bd92a587108e407"
