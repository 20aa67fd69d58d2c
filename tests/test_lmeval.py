"""A bundled lm-eval task runs offline on a tiny model built in the test."""

import json

import pytest

from quantgate.evaluate.lmeval import lastword_docs, run_tasks, write_task_dir
from quantgate.recipe import LMEvalSpec


def test_lastword_docs_split_context_and_target():
    docs = lastword_docs(["One two three four five six seven eight nine ten eleven twelve thirteen. Short one."])
    assert docs == [{"context": "One two three four five six seven eight nine ten eleven twelve", "target": " thirteen"}]


@pytest.mark.timeout(300)
def test_bundled_tasks_run_offline_on_tiny_model(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"Question {i}?", "answer_a": "yes", "answer_b": "no",
                                        "answer_c": "maybe", "answer_d": "never", "correct_answer": "ABCD"[i % 4],
                                        "topic": "t"}) + "\n" for i in range(8)))
    prose = " ".join(f"In the year {1500 + i} the old town by the river held a market for bread and cloth and wine." for i in range(10))
    folder = write_task_dir(tmp_path / "tasks", [prose], mmlu)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    scores = run_tasks(model, tok, LMEvalSpec(tasks=["qg_lastword", "qg_mmlu"], limit=6, batch_size=2), task_dir=folder)
    assert set(scores) == {"qg_lastword", "qg_mmlu"}
    assert 0.0 <= scores["qg_lastword"]["acc"] <= 1.0 and scores["qg_lastword"]["perplexity"] > 1.0
    assert 0.0 <= scores["qg_mmlu"]["acc"] <= 1.0
