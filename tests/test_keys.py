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

PINNED = {  # candidate: (artifact key, evaluation key)
    "base": ("701dbf615f20777596fe92c4eb863c22df7c6ecb6cd7657bcc670983f15723a5",
             "4eaa7bf9746d0f11337711cdd2a8066472e55dc3eb905f0115ea1959fe663a76"),
    "r4": ("15e6e554601d0f4b633cca08d9b6c37a57436fe083a472f1a9affd469d7b27a2",
           "91f93b440d88e8346205f8bf4ed7a560b1ac01c1ae4cbb3b50928b85058b9e7b"),
    "g4": ("3bd92a587108e40725fcaba7711cb1e09b1fa234ca5e488617357beab0be254c",
           "7653bca312dc7ebbdfd0a29d88e755591eb024d6a03b4d044e9a1be1c81f1439"),
    "a4": ("f72d781305de7bd346b6650e3e54d4b72230cc1b420674753983605d5fb789fc",
           "a2610b39dcb9e299df7a4ee4915dafdc946b131e82cfef00b05731f7bd28383f"),
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
