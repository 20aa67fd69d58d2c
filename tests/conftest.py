"""Shared fixtures: a tiny random Llama (with a tokenizer trained here) and an isolated cache.

The tiny model is built inside the test session, so unit tests need no download and no hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be, or not to be, that is the question. All that glitters is not gold. "
    "Knowledge is power, and brevity is the soul of wit. "
)


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_recipe(tmp_path: Path, tiny_model: Path, corpus_file: Path, *, name: str, requests: int,
                      concurrency: int, prompt: str = "Tell me about item {i}.", prompts: int = 3,
                      regression_id: str = "any") -> Path:
    """A whole recipe (baseline + RTN 4-bit, every evaluation on, two gates) sized for the tiny model."""
    import json

    import yaml

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": prompt.format(i=i)}) + "\n" for i in range(prompts)))
    regression = tmp_path / "reg.jsonl"
    regression.write_text(json.dumps({"id": regression_id, "prompt": "Say something.",
                                      "checks": [{"type": "min_len", "value": 1}]}) + "\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "model": {"ref": str(tiny_model)},
        "candidates": [{"name": "base", "method": "baseline", "dtype": "float32"},
                       {"name": "rtn4", "method": "rtn", "bits": 4, "group_size": 32}],
        "evaluation": {
            "perplexity": {"path": str(corpus_file), "seq_len": 32, "max_windows": 4, "batch_size": 2},
            "regression": {"path": str(regression), "max_tokens": 4},
            "offline": {"prompt_tokens": 16, "output_tokens": 4, "repeats": 1},
            "workload": {"requests": requests, "concurrency": concurrency, "prompts_file": str(prompts_file),
                         "warmup_requests": 0, "mix": [{"name": "short", "prompt_tokens": 8, "output_tokens": 4}]},
            "cost": {"usd_per_hour": 1.0},
        },
        "card": {"gates": [{"metric": "perplexity", "min_recovery": 0.5}, {"metric": "error_rate", "max": 0}]},
    }))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    """A local text source large enough for a few calibration windows in its calib split."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text((f"Document {i}. " + TEXT) * 8)
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    # unit tests never touch the user's cache; e2e tests use it (the converted model, the corpora)
    if request.node.get_closest_marker("e2e") is None:
        monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
