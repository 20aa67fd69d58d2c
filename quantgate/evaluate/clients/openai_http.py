"""An engine for any OpenAI-compatible server: vLLM, SGLang, TGI, llama.cpp server, ...

Streams `/v1/chat/completions` with `stream: true` and `stream_options.include_usage`, so the
server's own token counts arrive in the last chunk. `ignore_eos` is sent when the request asks
for it (vLLM and SGLang honour it; servers that do not know it ignore it), so a load test gets
the output length it asked for.

One pooled aiohttp session per engine, opened in `start()` and closed in `close()`. aiohttp
sets TCP_NODELAY on every connection it opens (aiohttp.base_protocol), so small SSE frames are
not held back by Nagle's algorithm. The SSE decoder is a pure class, tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import AsyncIterator

from ...errors import QuantgateError
from .base import Chunk, GenerationRequest

DONE = object()  # the decoder's marker for `data: [DONE]`
DRAIN_S = 1.0  # how long to wait for a stream's end after [DONE]


def deadline(seconds: float):
    """asyncio.timeout on Python 3.11+, async_timeout (an aiohttp dependency) before."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    import async_timeout  # pragma: no cover - Python 3.10

    return async_timeout.timeout(seconds)  # pragma: no cover


class EngineRequestError(QuantgateError):
    """One request failed at the server or on the way there; the message says which and why."""


class SSEDecoder:
    """Incremental Server-Sent Events decoder for OpenAI-style streams.

    Feed it bytes as they arrive; it returns the events completed so far: a parsed JSON
    payload (dict), or DONE. A `data:` line whose payload is complete JSON (or [DONE]) is
    delivered at once, without waiting for the blank line that ends the event, so a server
    that forgets the blank line still streams and no chunk is held back; a payload split over
    several `data:` lines is joined at the blank line, as the SSE spec says. Comment lines
    (`:` keep-alives) and `id:`/`retry:` fields are ignored; `event: error` marks the payload
    as an error.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, data: bytes) -> list:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out: list = []
        for raw in lines:
            self._line(raw.rstrip(b"\r").decode("utf-8", errors="replace"), out)
        return out

    def close(self) -> list:
        """End of stream: flush a last line without a newline and any pending event."""
        out: list = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r").decode("utf-8", errors="replace"), out)
            self._buf = b""
        self._dispatch(out)
        return out

    def _line(self, line: str, out: list) -> None:
        if not line:
            self._dispatch(out)
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            joined = "\n".join(self._data)
            if joined.strip() == "[DONE]" or _is_json(joined):
                self._dispatch(out)

    def _dispatch(self, out: list) -> None:
        if not self._data:
            self._event = ""
            return
        payload = "\n".join(self._data).strip()
        event, self._data, self._event = self._event, [], ""
        if payload == "[DONE]":
            out.append(DONE)
            return
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            raise EngineRequestError(f"the server sent an SSE event that is not JSON: {payload[:200]!r}") from None
        if event == "error" and isinstance(obj, dict) and "error" not in obj:
            obj = {"error": obj}
        out.append(obj)


def _is_json(s: str) -> bool:
    s = s.strip()
    if not s or s[0] not in "{[":
        return False
    try:
        json.loads(s)
    except json.JSONDecodeError:
        return False
    return True


def _error_text(obj) -> str:
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or json.dumps(err)[:300])
    return str(err)[:300]


def chunk_of(obj: dict) -> Chunk | None:
    """One decoded stream event → a Chunk (None for an event with neither text nor usage).
    Also reads a non-streamed completion, for servers that ignore `stream`."""
    if not isinstance(obj, dict):
        return None
    if obj.get("error") or obj.get("object") == "error":  # OpenAI's shape, and vLLM's
        raise EngineRequestError(f"the server reported an error mid-stream: {_error_text(obj)}")
    text = ""
    for choice in obj.get("choices") or ():
        part = choice.get("delta") or choice.get("message") or {}
        # reasoning models stream their thinking in a separate field; those are tokens too
        piece = (part.get("content") or part.get("reasoning_content") or part.get("reasoning")
                 or choice.get("text") or "")
        text += piece if isinstance(piece, str) else ""
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    if not text and usage is None:
        return None
    return Chunk(text=text, usage=usage)


def chat_url(base_url: str) -> str:
    """`http://h:8000`, `http://h:8000/` or `http://h:8000/v1` → `.../v1/chat/completions`."""
    return api_root(base_url) + "/chat/completions"


def api_root(base_url: str) -> str:
    b = base_url.rstrip("/")
    if b.endswith("/chat/completions"):
        b = b[: -len("/chat/completions")]
    return b if b.endswith("/v1") else b + "/v1"


class OpenAIClient:
    """The client contract over HTTP, to any OpenAI-compatible server. `timeout` bounds connecting and each wait for more bytes;
    the load generator's per-request timeout bounds the whole request."""

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, extra_body: dict | None = None, max_connections: int = 4096):
        if not base_url.startswith(("http://", "https://")):
            raise QuantgateError(f"--url '{base_url}' needs a scheme, e.g. http://127.0.0.1:8000")
        self.base_url = base_url
        self.url = chat_url(base_url)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self.max_connections = max_connections
        self._session = None
        # X-Request-Id: unique per request (vLLM rejects a running id twice) and a UUID, which
        # llama-cpp-python's server insists on (anything else is an HTTP 400); our own id travels
        # in X-Quantgate-Request so server logs can be matched to the load report
        self._tag = f"qg-{uuid.uuid4().hex[:8]}-"

    async def start(self) -> None:
        import aiohttp

        if self._session is not None:
            return
        conn = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, ttl_dns_cache=300,
                                    enable_cleanup_closed=False)
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(
            connector=conn, headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "OpenAIClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def body(self, req: GenerationRequest) -> dict:
        body = {"model": self.model, "messages": req.messages, "max_tokens": req.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        if req.ignore_eos:
            body["ignore_eos"] = True
        if req.greedy:
            body["temperature"] = 0
        body.update(self.extra_body)
        return body

    async def list_models(self) -> list[str]:
        """Model ids the server serves (GET /v1/models)."""
        async with self._request("GET", api_root(self.base_url) + "/models") as resp:
            await self._check(resp)
            data = await resp.json(content_type=None)
        return [m.get("id") for m in (data or {}).get("data", []) if isinstance(m, dict) and m.get("id")]

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        if self.model is None:
            raise QuantgateError("OpenAIClient: no model name; pass model= (or --model)")
        async with self._request("POST", self.url, json=self.body(req), headers={"X-Request-Id": str(uuid.uuid4()),
                                                                                "X-Quantgate-Request": self._tag + req.id}) as resp:
            await self._check(resp)
            try:
                if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    # a server that ignored `stream`: one whole completion
                    chunk = chunk_of(await resp.json(content_type=None))
                    if chunk is not None:
                        yield chunk
                    return
                dec = SSEDecoder()
                done = False
                async for data in resp.content.iter_any():
                    for ev in dec.feed(data):
                        if ev is DONE:
                            done = True
                        elif (chunk := chunk_of(ev)) is not None:
                            yield chunk
                    if done:
                        break
                if not done:  # a stream that just ends (no [DONE]) is still a whole stream
                    for ev in dec.close():
                        if ev is not DONE and (chunk := chunk_of(ev)) is not None:
                            yield chunk
                elif not resp.content.at_eof():
                    # read the few bytes after [DONE] (the chunked terminator) so the connection
                    # goes back to the pool; a server that keeps the stream open is not waited for
                    with contextlib.suppress(asyncio.TimeoutError, *self._client_errors()):
                        async with deadline(DRAIN_S):
                            await resp.content.read()
            except asyncio.TimeoutError:
                raise
            except self._client_errors() as exc:
                raise EngineRequestError(f"{self.url}: the stream broke off ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------ internals
    def _request(self, method: str, url: str, **kw):
        if self._session is None:
            raise QuantgateError("OpenAIClient: call `await engine.start()` before sending requests")
        return _Guarded(self._session.request(method, url, **kw), url, self._client_errors())

    @staticmethod
    def _client_errors():
        import aiohttp

        return (aiohttp.ClientError,)

    async def _check(self, resp) -> None:
        if resp.status == 200:
            return
        text = (await resp.text(errors="replace"))[:500]
        try:
            detail = _error_text(json.loads(text))
        except (json.JSONDecodeError, ValueError):
            detail = text.strip() or resp.reason or ""
        raise EngineRequestError(f"HTTP {resp.status} from {resp.url}: {detail}")


class _Guarded:
    """Turns connection failures while opening a request into EngineRequestError."""

    def __init__(self, ctx, url: str, errors: tuple):
        self._ctx, self._url, self._errors = ctx, url, errors

    async def __aenter__(self):
        try:
            return await self._ctx.__aenter__()
        except asyncio.TimeoutError:
            raise
        except self._errors as exc:
            raise EngineRequestError(f"cannot reach {self._url}: {_reason(exc)}") from None

    async def __aexit__(self, *exc):
        return await self._ctx.__aexit__(*exc)


def _reason(exc: BaseException) -> str:
    os_err = getattr(exc, "os_error", None)
    if os_err is not None and getattr(os_err, "strerror", None):
        return os_err.strerror
    return f"{type(exc).__name__}: {exc}"
