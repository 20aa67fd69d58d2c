"""Where load-test prompt text comes from — one rule for the evaluation, the engine matrix and
`quantgate loadtest`:

1. `workload.prompts_file`: a JSONL file whose rows carry a `prompt` (a relative path is read
   beside the workload file first);
2. else the eval split of the workload's bundled corpus (never calibration text);
3. else, when that bundled corpus has not been fetched and the caller accepts it (`warn`), a
   short built-in English text, with a warning saying so.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QuantgateError
from ..util import iter_jsonl

FALLBACK_TEXT = [
    "The river rises in the hills to the north and runs south through farmland and small towns "
    "before it reaches the sea. In spring the water is high and fast; by late summer it is slow "
    "enough that children wade across the shallows near the old stone bridge.",
    "A good map leaves things out. It shows the roads a traveller needs, the rivers that must be "
    "crossed and the towns where food and rest can be found, and it trusts the reader to ask for "
    "more detail where more detail matters.",
    "The committee met on Tuesday to review the budget for the coming year. Most of the discussion "
    "concerned the cost of repairs to the library roof, which had leaked through the winter and "
    "damaged a number of older books in the reading room.",
    "Bread is made from flour, water, salt and yeast. The dough is kneaded until it is smooth, left "
    "to rise in a warm place, shaped, left to rise again and then baked in a hot oven until the "
    "crust is brown and the loaf sounds hollow when tapped.",
    "Explain, step by step and in plain language, how a lighthouse keeper in the nineteenth century "
    "would have kept the lamp burning through a long winter night, and what could go wrong.",
]



def jsonl_prompts(path: str | Path, field_name: str = "prompt") -> list[str]:
    """Texts from a JSONL file whose rows carry the text in `field_name`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuantgateError(f"prompts file {p} does not exist; give a JSONL file with a '{field_name}' field")
    texts = []
    for i, row in iter_jsonl(p):
        if not isinstance(row.get(field_name), str):
            raise QuantgateError(f"{p}:{i}: each line needs a string field '{field_name}' (got: {', '.join(row)})")
        texts.append(row[field_name])
    return texts


def corpus_prompts(corpus: str) -> list[str]:
    """The eval split of a bundled corpus (the calibration split is never used for prompts)."""
    from ..data import split_documents
    from ..recipe import SourceSpec

    return [d.text for d in split_documents(SourceSpec(corpus=corpus), "eval")]


def prompt_texts(workload, *, base: Path | None = None, warn=None) -> tuple[list[str], str]:
    """(texts, where they came from) for a workload, by the rule in the module docstring."""
    if workload.prompts_file:
        p = Path(workload.prompts_file).expanduser()
        if not p.is_absolute() and base is not None and (Path(base) / p).is_file():
            p = Path(base) / p
        return jsonl_prompts(p), str(p)
    from ..data import CORPORA

    try:
        return corpus_prompts(workload.corpus), f"corpus {workload.corpus} (eval split)"
    except QuantgateError as exc:
        if warn is None or workload.corpus not in CORPORA:
            raise
        warn(f"{exc}\nusing a short built-in English text for the prompts instead")
        return list(FALLBACK_TEXT), "built-in text"
