"""The OpenAI engine's pure parts: the SSE decoder, chunk reading, URLs and request bodies."""

from __future__ import annotations

import json

import pytest

from quantgate.evaluate.clients.base import GenerationRequest
from quantgate.evaluate.clients.openai_http import (
    DONE, EngineRequestError, OpenAIClient, SSEDecoder, chat_url, chunk_of,
)

VLLM_STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo \xc3\xa9t\xc3\xa9"}}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n'
    b"data: [DONE]\n\n"
)


def decode(parts) -> list:
    dec = SSEDecoder()
    out = []
    for p in parts:
        out += dec.feed(p)
    return out + dec.close()


def test_decoder_is_independent_of_how_bytes_are_split():
    whole = decode([VLLM_STREAM])
    byte_by_byte = decode([VLLM_STREAM[i:i + 1] for i in range(len(VLLM_STREAM))])
    crlf = decode([VLLM_STREAM.replace(b"\n", b"\r\n")])
    assert whole == byte_by_byte == crlf
    assert whole[-1] is DONE and len(whole) == 5
    chunks = [chunk_of(e) for e in whole[:-1]]
    assert chunks[0] is None  # the empty role chunk is not a token
    assert [c.text for c in chunks[1:3]] == ["Hel", "lo été"]
    assert chunks[3].text == "" and chunks[3].usage["completion_tokens"] == 2


def test_decoder_delivers_a_json_line_before_its_blank_line():
    dec = SSEDecoder()
    assert dec.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n') == [{"choices": [{"delta": {"content": "a"}}]}]
    # no blank line between events (a sloppy server), no space after the colon
    assert len(dec.feed(b'data:{"choices":[]}\ndata: [DONE]\n')) == 2


def test_decoder_joins_multiline_data_and_marks_error_events():
    out = decode([b'data: {"choices":\ndata: [{"delta":{"content":"x"}}]}\n\n',
                  b'event: error\ndata: {"message": "overloaded"}\n\n'])
    assert chunk_of(out[0]).text == "x"
    with pytest.raises(EngineRequestError, match="overloaded"):
        chunk_of(out[1])
    with pytest.raises(EngineRequestError, match="not JSON"):
        decode([b"data: hello\n\n"])


def test_chunk_of_other_server_shapes():
    assert chunk_of({"choices": [{"delta": {"reasoning_content": "hmm"}}]}).text == "hmm"
    assert chunk_of({"choices": [{"text": "legacy"}]}).text == "legacy"  # /v1/completions style
    assert chunk_of({"choices": [{"delta": {"content": None}}], "usage": None}) is None
    with pytest.raises(EngineRequestError, match="prompt too long"):
        chunk_of({"object": "error", "message": "prompt too long", "type": "BadRequestError", "code": 400})
    whole = chunk_of({"choices": [{"message": {"content": "all at once"}}], "usage": {"completion_tokens": 3}})
    assert whole.text == "all at once" and whole.usage == {"completion_tokens": 3}


@pytest.mark.parametrize("base", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                  "http://h:8000/v1/chat/completions"])
def test_chat_url(base):
    assert chat_url(base) == "http://h:8000/v1/chat/completions"


def test_request_body():
    eng = OpenAIClient("http://h:1", "m", extra_body={"temperature": 0.0})
    req = GenerationRequest(id="r1", messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    body = eng.body(req)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
    assert "ignore_eos" not in eng.body(GenerationRequest(id="r", messages=[], max_tokens=1, ignore_eos=False))
    json.dumps(body)
    with pytest.raises(Exception, match="scheme"):
        OpenAIClient("localhost:8000", "m")
