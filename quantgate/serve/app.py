"""The HTTP face of the gateway (aiohttp): /chat, /v1/chat/completions, /metrics, /healthz, /readyz.

Thin on purpose: parse and validate the request, identify the tenant, hand a `ChatCall` to the
`Gateway`, and write its answer (JSON, or SSE for streams). Every error is JSON in the OpenAI
shape — {"error": {"type", "message", "param"}} — with `param` naming the field to fix; the
trace id travels in `x-trace-id` both ways.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from json.encoder import encode_basestring as _enc  # the C string escaper json.dumps uses

from aiohttp import web
from pydantic import ValidationError

from .connections import ConnectionTable
from .gateway import Answer, ChatCall, Gateway, GatewayError
from .guards.input_size import body_shape_problem, prompt_tokens
from .trace import event as trace_event, outcome_of
from .schemas import ChatCompletionRequest, ChatRequest, describe
from .access import (Principal, Refusal, admin_problem, host_problem, identify, is_json, key_of, lookup,
                     origin_problem)

log = logging.getLogger("quantgate.serve")
perf = time.perf_counter
_TRACE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_JSON = "application/json"
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() also accepts '²', which int() refuses
CONNECTIONS = web.AppKey("connections", ConnectionTable)


def _internal(trace: str | None) -> GatewayError:
    return GatewayError(500, "internal_error",
                        f"internal error; the gateway log has the details under trace id {trace}")


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class Handlers:
    def __init__(self, gw: Gateway, bind_host: str = "127.0.0.1", connections: ConnectionTable | None = None):
        self.gw, self.bind_host = gw, bind_host
        self.connections = connections if connections is not None else ConnectionTable(1 << 30, 1 << 30, 0.0)
        # Generated trace ids: a random per-process prefix and a counter (unique, and no syscall
        # per request the way os.urandom would be).
        self._trace_prefix = os.urandom(4).hex()
        self._trace_n = itertools.count(1)
        self._known_keys: tuple[dict, dict[str, Principal]] = ({}, {})  # (key table it is for, raw key → who)

    # ------------------------------------------------------------- helpers
    def _trace(self, request: web.Request) -> str:
        t = request.headers.get("x-trace-id")
        if t is None:
            return f"{self._trace_prefix}{next(self._trace_n):08x}"
        if not _TRACE.fullmatch(t):
            raise GatewayError(400, "invalid_request_error",
                               "x-trace-id: use 1 to 128 letters, digits or . _ : -", "x-trace-id")
        return t

    async def _body(self, request: web.Request) -> bytes:
        limit = self.gw.rt.serving.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise GatewayError(413, "invalid_request_error", f"body: {request.content_length} bytes is more than "
                               f"this gateway accepts ({limit})", "body")
        try:
            if request.content.is_eof():  # all of it came with the headers (most requests): no timer to arm
                raw = await request.read()
            else:
                async with asyncio.timeout(self.gw.rt.serving.http.body_timeout_s):
                    raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = None
        except TimeoutError:
            raise GatewayError(408, "invalid_request_error", "body: not received in time "
                               f"(serving.http.body_timeout_s={self.gw.rt.serving.http.body_timeout_s})", "body",
                               {"Connection": "close"}) from None
        if raw is None or len(raw) > limit:  # a chunked body has no Content-Length to check up front
            raise GatewayError(413, "invalid_request_error", f"body: more than this gateway accepts ({limit} bytes)",
                               "body")
        return raw

    async def _parse(self, request: web.Request, model):
        """The body as `model`, or a 400 naming the first field that is wrong."""
        raw = await self._body(request)
        if (problem := body_shape_problem(raw, self.gw.rt.serving.max_messages)) is not None:
            raise problem
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            field, msg = describe(exc)
            raise GatewayError(400, "invalid_request_error", msg, field) from None

    def _principal(self, request: web.Request) -> tuple[Principal | None, bool]:
        """The caller's key, looked up: (principal or None, whether a key was given at all)."""
        keys = self.gw.rt.keys
        key = key_of(request.headers)
        if key is None:
            return None, False
        table, known = self._known_keys
        if table is not keys:  # a reload brought new keys: forget what was learnt from the old ones
            table, known = self._known_keys = (keys, {})
        return lookup(keys, known, key), True

    def _gatekeep(self, request: web.Request) -> str | None:
        """The key check on the headers alone, before the body is read: an unknown key, an admin key,
        or none where one is needed is refused without reading or parsing what was sent. A connection
        that passes keeps its place (serve/connections.py). Returns the key's id (None: anonymous)."""
        principal, given = self._principal(request)
        if given and principal is not None and not principal.admin:
            self.connections.proven(request.protocol)
            return principal.key_id
        self._identity(request, None, None)  # raises for what the headers alone refuse
        self.connections.proven(request.protocol)
        return None

    def _identity(self, request: web.Request, tenant: str | None, user: str | None) -> tuple[str, str | None]:
        """(tenant, user) from the API key when keys are used; the body or x-tenant only when anonymous."""
        principal, given = self._principal(request)
        try:
            return identify(self.gw.rt.serving, self.gw.rt.keys, principal, given,
                            tenant or request.headers.get("x-tenant"), user)
        except Refusal as r:
            raise GatewayError(r.status, r.type, str(r), r.param) from None

    def _check_origin(self, request: web.Request, post: bool) -> None:
        """Refuse what a web page could send to a gateway on this machine (no CORS preflight needed)."""
        http = self.gw.rt.serving.http
        if host_problem(request.headers.get("host"), self.bind_host, http.allowed_hosts):
            raise GatewayError(421, "invalid_request_error", "host: this gateway does not answer to that name "
                               "(serving.http.allowed_hosts lists extra names)", "host")
        if origin_problem(request.headers.get("origin"), http.allowed_origins):
            raise GatewayError(403, "permission_error", "origin: browser requests from this origin are not allowed "
                               "(serving.http.allowed_origins)", "origin")
        if post and not is_json(request.headers.get("content-type")):
            raise GatewayError(415, "invalid_request_error", "content-type: send the body as application/json",
                               "content-type")

    def _budget(self, request: web.Request, body_value: int | None) -> int | None:
        if body_value is not None:
            return body_value
        h = request.headers.get("x-budget-ms")
        if h is None:
            return None
        if not _DIGITS.fullmatch(h) or int(h) <= 0:
            raise GatewayError(400, "invalid_request_error", "x-budget-ms: a positive whole number of milliseconds",
                               "x-budget-ms")
        return int(h)

    def _error(self, route: str, trace: str | None, e: GatewayError, t0: float) -> web.Response:
        m = self.gw.metrics
        if e.status < 429 or e.status == 413:
            reason = "auth" if e.status in (401, 403) else "bad_request"
            m.rejected.labels(reason).inc()
            m.unrouted().request(route, reason, perf() - t0)
        elif e.status == 429:
            m.unrouted().request(route, "rejected_429", perf() - t0)
        elif e.type == "internal_error":  # 502 and 504 were counted by the gateway, with their deployment
            m.unrouted().request(route, "internal_error", perf() - t0)
        err = {"type": e.type, "message": str(e), "param": e.param, "code": e.status, **e.extra}
        headers = dict(e.headers)
        if trace:
            headers["x-trace-id"] = trace
        return web.Response(status=e.status, body=_dumps({"error": err, "trace_id": trace}),
                            content_type=_JSON, headers=headers)

    @staticmethod
    def _headers(trace: str, a: Answer) -> dict[str, str]:
        return {"x-trace-id": trace, "x-quantgate-deployment": a.deployment.name,
                "x-quantgate-model-version": a.deployment.model_version,
                "x-quantgate-cache": "hit" if a.cached else "miss", "x-quantgate-degrade-level": a.level.label}

    def _note(self, route: str, stream: bool, call: ChatCall | None, t0: float, a: Answer | None = None,
              err: GatewayError | None = None, closed: bool = False) -> None:
        """Hand a finished request to the trace (serving.trace); nothing at all when tracing is off."""
        tw = self.gw.trace
        if tw is None:
            return
        if call is None and err is not None and err.status in (401, 403, 421):
            return  # refused at the door (key, Host, Origin): anyone could rotate real traffic out with those
        text = tw.spec.include_text
        if a is not None:
            out = outcome_of(None, cached=a.cached, degraded=len(a.path) > 1 or bool(a.reasons))
            tin, tout, level, path, budget = a.tokens_in, a.tokens_out, a.level.label, a.path, a.budget_ms
        else:
            out = outcome_of(err.status if err else None, error_type=err.type if err else None,
                             limit=(err.extra.get("limit") or err.extra.get("account")) if err else None,
                             closed=closed)
            tin = prompt_tokens(call.messages) if call is not None else 0
            tout, level, path, budget = 0, None, (err.extra.get("path") if err else None), None
        tw.add(trace_event(
            time.time() - (perf() - t0), call.tenant if call else None, route, stream, out, tokens_in=tin,
            tokens_out=tout, max_tokens=call.max_tokens if call else None,
            budget_ms=budget or (call.budget_ms if call else None), level=level, path=path,
            prompt="\n".join(m["content"] for m in call.messages) if text and call else None,
            answer=a.text if text and a is not None else None, arm=call.arm if call else "stable",
            deployment=a.deployment.key if a is not None else None))

    # ------------------------------------------------------------- /chat
    async def chat(self, request: web.Request) -> web.StreamResponse:
        t0, trace, call = perf(), None, None
        try:
            trace = self._trace(request)
            self._check_origin(request, True)
            key_id = self._gatekeep(request)
            req = await self._parse(request, ChatRequest)
            call = ChatCall("chat", trace, *self._identity(request, req.tenant, req.user_id),
                            [{"role": "user", "content": req.prompt}], t0, req.budget_ms, req.max_tokens,
                            req.temperature, key_id=key_id)
            a = await self.gw.chat(call)
        except GatewayError as e:
            self._note("chat", False, call, t0, err=e)
            return self._error("chat", trace, e, t0)
        except asyncio.CancelledError:  # the client left
            self._note("chat", False, call, t0, closed=True)
            raise
        except Exception:  # a bug: answer like every other error, keep serving, log the traceback
            log.exception("internal error (trace %s)", trace)
            self._note("chat", False, call, t0, err=_internal(trace))
            return self._error("chat", trace, _internal(trace), t0)
        self._note("chat", False, call, t0, a)
        body = a.info_json(trace)[:-1] + ',"text":' + _enc(a.text) + "}"
        return web.Response(body=body.encode(), content_type=_JSON, headers=self._headers(trace, a))

    # ------------------------------------------------------------- /v1/chat/completions
    async def completions(self, request: web.Request) -> web.StreamResponse:
        t0, trace, call = perf(), None, None
        try:
            trace = self._trace(request)
            self._check_origin(request, True)
            key_id = self._gatekeep(request)
            req = await self._parse(request, ChatCompletionRequest)
            call = ChatCall("openai", trace, *self._identity(request, req.tenant, req.user),
                            [{"role": m.role, "content": m.text()} for m in req.messages], t0,
                            self._budget(request, req.budget_ms), req.max_completion_tokens or req.max_tokens,
                            req.temperature, req.top_p, req.stop_list(), req.seed, bool(req.ignore_eos), key_id)
            if req.stream:
                return await self._stream(request, call, req, t0)
            a = await self.gw.chat(call)
        except GatewayError as e:
            self._note("openai", bool(call is not None and req.stream), call, t0, err=e)
            return self._error("openai", trace, e, t0)
        except asyncio.CancelledError:
            if call is None or not req.stream:  # a stream notes its own end (_stream)
                self._note("openai", False, call, t0, closed=True)
            raise
        except Exception:
            log.exception("internal error (trace %s)", trace)
            self._note("openai", bool(call is not None and req.stream), call, t0, err=_internal(trace))
            return self._error("openai", trace, _internal(trace), t0)
        self._note("openai", False, call, t0, a)
        body = (  # by hand, like Answer.info_json: this is the hot path
            f'{{"id":"chatcmpl-{trace}","object":"chat.completion","created":{int(time.time())},'
            f'"model":{_enc(a.deployment.name)},"choices":[{{"index":0,"message":{{"role":"assistant",'
            f'"content":{_enc(a.text)}}},"finish_reason":{_enc(a.finish_reason)}}}],'
            f'"usage":{{"prompt_tokens":{a.tokens_in},"completion_tokens":{a.tokens_out},'
            f'"total_tokens":{a.tokens_in + a.tokens_out}}},"quantgate":{a.info_json(trace)}}}'
        )
        return web.Response(body=body.encode(), content_type=_JSON, headers=self._headers(trace, a))

    async def _stream(self, request: web.Request, call: ChatCall, req: ChatCompletionRequest,
                      t0: float) -> web.StreamResponse:
        events = self.gw.chat_stream(call)
        try:
            _, dep = await events.__anext__()  # errors before the first piece still get a status code
        except asyncio.CancelledError:
            self._note("openai", True, call, t0, closed=True)
            await events.aclose()
            raise
        except BaseException:
            await events.aclose()
            raise
        trace = call.trace_id
        resp = web.StreamResponse(headers={
            "content-type": "text/event-stream", "cache-control": "no-cache", "x-trace-id": trace,
            "x-quantgate-deployment": dep.name, "x-quantgate-model-version": dep.model_version})
        base = {"id": f"chatcmpl-{trace}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": dep.name}

        done: Answer | None = None
        failed: str | None = None
        closed = False

        def chunk(delta: dict, finish=None, **more) -> bytes:
            return b"data: " + _dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                       **more}) + b"\n\n"

        try:
            await resp.prepare(request)
            await resp.write(chunk({"role": "assistant", "content": ""}))
            async for kind, val in events:
                if kind == "delta":
                    await resp.write(chunk({"content": val}))
                elif kind == "end":
                    done = val
                    await resp.write(chunk({}, val.finish_reason, quantgate=val.info(trace)))
                    if req.stream_options and req.stream_options.include_usage:
                        usage = {"prompt_tokens": val.tokens_in, "completion_tokens": val.tokens_out,
                                 "total_tokens": val.tokens_in + val.tokens_out}
                        await resp.write(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
                elif kind == "error":
                    failed = val
                    err = {"error": {"type": "upstream_error", "message": val}}
                    await resp.write(b"data: " + _dumps(err) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client left mid-stream: charged and counted by the gateway, no traceback
            closed = True
        except asyncio.CancelledError:
            closed = True
            raise
        finally:
            await events.aclose()
            if self.gw.trace is not None:
                if done is not None and not closed and failed is None:
                    self._note("openai", True, call, t0, done)
                else:
                    self._note("openai", True, call, t0, closed=closed,
                               err=None if closed else GatewayError(502, "upstream_error", failed or "stream cut"))
        return resp

    # ------------------------------------------------------------- operations
    def _ops(self, request: web.Request) -> web.Response | None:
        """None when the caller may see operational details; else the refusal to send."""
        try:
            self._check_origin(request, False)
        except GatewayError as e:
            return self._error("ops", None, e, perf())
        refusal = admin_problem(self.gw.rt.keys, self._principal(request)[0])
        if refusal is None:
            return None
        return self._error("ops", None, GatewayError(refusal.status, refusal.type, str(refusal), refusal.param), perf())

    async def metrics(self, request: web.Request) -> web.Response:
        refused = self._ops(request)
        if refused is not None:
            return refused
        return web.Response(body=self.gw.metrics.render(), headers={"content-type": self.gw.metrics.content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"alive"}', content_type=_JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        """Status for everyone (probes carry no key); the details (deployments, paths) for admins only."""
        ok, detail = await self.gw.readiness()
        if self._ops(request) is not None:
            detail = {}
        detail["status"] = "ready" if ok else "not ready"
        return web.Response(status=200 if ok else 503, body=_dumps(detail), content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        """The deployments, for the callers who may use them: the same Host, Origin and key checks as a
        request (an admin key may look too)."""
        try:
            self._check_origin(request, False)
            principal, given = self._principal(request)
            if not (given and principal is not None and principal.admin):
                self._gatekeep(request)
        except GatewayError as e:
            return self._error("models", None, e, perf())
        rt = self.gw.rt
        deps = [rt.active] + ([rt.fallback] if rt.fallback else [])
        return web.Response(body=_dumps({"object": "list", "data": [
            {"id": d.name, "object": "model", "owned_by": "quantgate", "model_version": d.model_version}
            for d in deps]}), content_type=_JSON)


def make_app(gw: Gateway, bind_host: str = "127.0.0.1") -> web.Application:
    """The aiohttp application; the gateway must be started (its manifest loaded) first."""
    # aiohttp's own limit is a backstop for chunked bodies; the manifest's limit is checked per
    # request, so a reload that lowers it applies at once.
    app = web.Application(client_max_size=max(gw.rt.serving.max_body_bytes, 1 << 20) * 4)
    http = gw.rt.serving.http
    app[CONNECTIONS] = ConnectionTable(http.max_connections, http.max_connections_per_client,
                                       http.reserved_for_keyed)  # applied by server.limit_connections
    h = Handlers(gw, bind_host, app[CONNECTIONS])
    app.router.add_post("/chat", h.chat)
    app.router.add_post("/v1/chat/completions", h.completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    return app
