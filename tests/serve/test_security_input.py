"""Exact input caps (issue 19, finding 1): a prompt is sized with the deployment's own tokenizer and
chat template wherever the gateway has them (in process, or a checkpoint folder on this machine
behind an engine), the number of messages and each message's size are capped, and what is over
is refused with 413 and the numbers before any slot or budget is taken. The estimate that stands
in without a tokenizer no longer lets wide characters or empty messages pass as small."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gwkit import Counting, base_manifest

from quantgate.serve.guards import input_size
from quantgate.serve.ladder import Level
from quantgate.serve.manifest import Deployment, ServingSpec
from quantgate.serve.providers import tokens
from quantgate.serve.records import ChatCall, GatewayError, RequestState

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CJK = "漢" * 32_760          # the audit's flood: estimated 8,191 tokens at four characters a token
EMPTY = [{"role": "user", "content": ""}] * 31_000  # 1 MB of empty messages, estimated 1 token


def tokenizer_folder(folder: Path, template: str | None = CHATML) -> Path:
    """A byte-level BPE tokenizer (ASCII merges only: a CJK character is three tokens, as with many
    real vocabularies), saved the way transformers saves one, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, hello world"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def call(messages) -> ChatCall:
    return ChatCall("openai", "t1", "acme", None, messages, 100.0)


def state(max_tokens: int = 16) -> RequestState:
    ctx = RequestState.empty()
    ctx.max_tokens = max_tokens
    return ctx


def runtime(provider, dep: Deployment | None = None, **serving) -> SimpleNamespace:
    return SimpleNamespace(serving=ServingSpec(**serving), active=dep or Deployment(name="primary"), fallback=None,
                           providers={"active": provider})


NORMAL = SimpleNamespace(ladder=SimpleNamespace(level=Level.NORMAL))


def refusal(rt, messages) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        asyncio.run(input_size.take(NORMAL, rt, call(messages), state()))
    return e.value


# ------------------------------------------------------------------------------ the guard alone
def test_an_in_process_deployment_without_an_engine_context_is_still_counted_exactly():
    """The audit: with promote's default (in process, no max_model_len) the cap was the estimate,
    and 32,760 CJK characters (98,280 real tokens) passed as 8,191. A prompt the estimate lets through
    is counted with the deployment's tokenizer whether or not its engine names a context."""
    e = refusal(runtime(Counting(24_000)), [{"role": "user", "content": CJK[:8000]}])
    assert e.status == 413 and "24000 tokens (its tokenizer)" in str(e) and "max_input_tokens=8192" in str(e)
    assert (e.extra["size"], e.extra["limit"], e.extra["unit"]) == (24_000, 8192, "tokens")


def test_without_a_tokenizer_wide_characters_and_empty_messages_are_not_estimated_as_small():
    class NoTokenizer:
        def count_tokens(self, messages):
            return None

    cjk = refusal(runtime(NoTokenizer()), [{"role": "user", "content": CJK}])
    assert cjk.status == 413 and "about 32765 tokens" in str(cjk)
    empty = refusal(runtime(NoTokenizer(), max_messages=100_000), EMPTY)
    assert empty.status == 413 and empty.extra["size"] == 1 + 4 * 31_000
    assert input_size.prompt_tokens([{"role": "user", "content": "x" * 400}]) == 105  # ASCII: as before, +template


def test_too_many_messages_and_a_message_too_large_are_refused_by_their_own_caps_before_counting():
    tok = Counting(1)
    many = refusal(runtime(tok), EMPTY)
    assert many.status == 413 and many.param == "messages" and "31000 messages" in str(many)
    assert "max_messages=512" in str(many) and (many.extra["size"], many.extra["limit"]) == (31_000, 512)
    big = refusal(runtime(tok, max_message_chars=1000), [{"role": "system", "content": "s"},
                                                         {"role": "user", "content": "y" * 1001}])
    assert big.status == 413 and big.param == "messages.1.content" and "1001 characters" in str(big)
    assert tok.asked == 0


def test_a_tokenizer_that_cannot_render_the_messages_leaves_the_estimate_standing():
    class Raising:
        def count_tokens(self, messages):
            raise ValueError("Conversation roles must alternate user/assistant")

    ctx = state()
    asyncio.run(input_size.take(NORMAL, runtime(Raising()), call([{"role": "user", "content": "x" * 40}]), ctx))
    assert ctx.tokens_in == input_size.prompt_tokens([{"role": "user", "content": "x" * 40}])


# ------------------------------------------------------------------------------ the counter
def test_the_counter_matches_transformers_chat_template_and_is_loaded_once_per_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_folder(tmp_path / "ckpt")
    dep = Deployment(name="d", artifact=str(folder))
    counter = tokens.counter_for(dep)
    assert counter is not None and tokens.counter_for(Deployment(name="other", artifact=str(folder))) is counter
    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    for msgs in ([{"role": "user", "content": "hello world"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": CJK[:50]}],
                 [{"role": "user", "content": ""}] * 7):
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        want = len(out["input_ids"] if hasattr(out, "keys") else out)
        assert counter.count(msgs) == want
    assert counter.count([{"role": "user", "content": CJK}]) > 3 * 32_760  # three bytes, three tokens


def test_no_tokenizer_in_the_folder_or_a_remote_checkpoint_gives_no_counter(tmp_path):
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.gguf").write_bytes(b"GGUF")
    assert tokens.counter_for(Deployment(name="d", artifact=str(tmp_path / "gguf" / "model.gguf"))) is None
    assert tokens.counter_for(Deployment(name="d", artifact="hf://org/model")) is None
    assert tokens.counter_for(Deployment(name="d")) is None
    # a GGUF file whose folder holds the tokenizer files is counted with them
    tokenizer_folder(tmp_path / "gguf")
    assert tokens.counter_for(Deployment(name="d", artifact=str(tmp_path / "gguf" / "model.gguf"))) is not None


# ------------------------------------------------------------------------------ over HTTP
def test_the_audits_floods_are_refused_with_413_behind_an_engine_with_its_checkpoint_here(serve, upstream, tmp_path):
    """An OpenAI-compatible engine (vLLM's shape) whose checkpoint folder is on this machine: the
    gateway counts with its tokenizer and template, and the floods never reach the engine."""
    folder = tokenizer_folder(tmp_path / "ckpt")
    m = base_manifest(cache={"enabled": False})
    m["active"] = {"name": "up", "artifact": str(folder),
                   "provider": {"kind": "openai", "base_url": upstream.base_url, "model": "ok"}}
    srv = serve(m)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        def send(messages):
            return c.post("/v1/chat/completions", json={"model": "up", "messages": messages})

        r = send([{"role": "user", "content": CJK}])
        assert r.status_code == 413 and r.json()["error"]["limit"] == 8192, r.text
        r = send([{"role": "user", "content": CJK[:8000]}])  # the estimate lets it through; the tokenizer not
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert "tokens (its tokenizer)" in err["message"] and err["size"] > 24_000 and err["limit"] == 8192
        r = send(EMPTY)
        assert r.status_code == 413 and r.json()["error"]["param"] == "messages", r.text
        ok = send([{"role": "user", "content": "hello world"}])
        assert ok.status_code == 200, ok.text
        assert srv.gateway.rt.providers["active"].count_tokens([{"role": "user", "content": "hello world"}]) > 3


def test_a_flood_of_messages_is_refused_from_the_raw_body_before_it_is_validated(serve, monkeypatch):
    """Validating 31,000 empty messages holds the event loop for tens of milliseconds (every other
    request waits); the count is read off the body first, so the validator never sees it."""
    from quantgate.serve.schemas import ChatCompletionRequest

    validated = []
    plain = ChatCompletionRequest.model_validate_json
    monkeypatch.setattr(ChatCompletionRequest, "model_validate_json",
                        classmethod(lambda cls, raw: validated.append(len(raw)) or plain(raw)))
    srv = serve(base_manifest(cache={"enabled": False}))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": EMPTY})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and err["limit"] == 512 and "max_messages=512" in err["message"], err
        assert validated == []
        # `"role":` quoted inside a message is escaped in JSON, so it is not counted as a message
        quoted = [{"role": "user", "content": '{"role": "user"} ' * 600}]
        assert c.post("/v1/chat/completions", json={"model": "m", "messages": quoted}).status_code == 200
        assert len(validated) == 1


def test_the_raw_count_is_exact_for_plain_json_and_never_over_for_escaped_keys():
    body = json.dumps({"messages": [{"role": "user", "content": 'say "role": x'}] * 600}).encode()
    problem = input_size.body_shape_problem(body, 599)
    assert problem is not None and problem.status == 413 and "more than the 599 messages" in str(problem)
    assert input_size.body_shape_problem(body, 600) is None
    spaced = b'{"messages": [' + b",".join([b'{"role" \n :"user","content":""}'] * 513) + b"]}"
    assert input_size.body_shape_problem(spaced, 512) is not None and input_size.body_shape_problem(spaced, 513) is None
    escaped = b'{"messages": [' + b",".join([b'{"\\u0072ole":"user","content":""}'] * 600) + b"]}"
    assert input_size.body_shape_problem(escaped, 512) is None  # left to the parsed check (shape_problem)
