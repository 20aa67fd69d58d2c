import json
import random

import pytest

from quantgate.data import allocate, build_calibration, local_documents, sample_windows, split_of
from quantgate.errors import QuantgateError
from quantgate.recipe import CalibrationSpec, SourceSpec


def test_allocate_sums_exactly_and_follows_weights():
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(allocate(128, [0.7, 0.2, 0.1])) == 128
    assert allocate(8, [3, 1]) == [6, 2]


def test_split_rule_is_deterministic_and_holds_out_about_a_quarter():
    ids = [f"doc/{i}" for i in range(4000)]
    evals = [i for i in ids if split_of(i) == "eval"]
    assert [split_of(i) for i in ids] == [split_of(i) for i in ids]
    assert 0.2 < len(evals) / len(ids) < 0.3


def test_windows_are_non_overlapping_and_seeded():
    stream = list(range(1000))
    a = sample_windows(stream, 5, 100, random.Random(1), "s")
    b = sample_windows(stream, 5, 100, random.Random(1), "s")
    c = sample_windows(stream, 5, 100, random.Random(2), "s")
    assert a == b and a != c
    starts = [w[0] for w in a]
    assert all(s % 100 == 0 for s in starts) and len(set(starts)) == 5


def test_too_few_tokens_names_the_source_and_the_fix():
    with pytest.raises(QuantgateError, match=r"source 'tiny.txt' has 250 tokens .* room for 2 windows of 100, but 3"):
        sample_windows(list(range(250)), 3, 100, random.Random(0), "tiny.txt")


def test_calibration_is_reproducible_and_disjoint_from_eval(tiny_model, corpus_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = CalibrationSpec(sources=[SourceSpec(path=str(corpus_file))], n_samples=4, seq_len=32, seed=3)
    a, b = build_calibration(spec, tok), build_calibration(spec, tok)
    assert a.windows == b.windows and a.calib_hash == b.calib_hash
    assert len(a.windows) == 4 and all(len(w) == 32 for w in a.windows)
    other = build_calibration(spec.model_copy(update={"seed": 4}), tok)
    assert other.calib_hash != a.calib_hash
    # every calibration window comes from the calib split: its text is inside a calib document
    calib_docs = [d for d in local_documents(str(corpus_file)) if d.split == "calib"]
    eval_docs = [d for d in local_documents(str(corpus_file)) if d.split == "eval"]
    assert calib_docs and eval_docs
    assert {d.id for d in calib_docs}.isdisjoint({d.id for d in eval_docs})


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(QuantgateError, match=rf"{f}:2: no field 'text' \(fields: body\)"):
        local_documents(str(f))
    f.write_text("{not json\n")
    with pytest.raises(QuantgateError, match=rf"{f}:1: not valid JSON"):
        local_documents(str(f))


def test_unfetched_bundled_corpus_says_how_to_fetch():
    from quantgate.data import bundled_documents

    with pytest.raises(QuantgateError, match="run `quantgate fetch`"):
        bundled_documents("gutenberg")


def test_split_of_local_files_does_not_depend_on_where_the_folder_lives(tmp_path, corpus_file):
    import shutil

    moved = shutil.copytree(corpus_file, tmp_path / "elsewhere" / "deeper")
    a = [(d.id, d.split) for d in local_documents(str(corpus_file))]
    b = [(d.id, d.split) for d in local_documents(str(moved))]
    assert a == b and {s for _, s in a} == {"calib", "eval"}
