"""Streaming answers: the same attempts as a plain answer, but committed at the first piece.

Before the first piece arrives, a slow or failing deployment is abandoned for the next one in the
plan exactly as for a plain answer. Once a piece has been sent to the client the deployment is
fixed: the request's deadline then cuts the answer short (finish_reason 'length') instead of
starting again elsewhere, and an upstream failure ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .providers import GenResult, ProviderError, StreamStats
from .providers.base import estimate_tokens, within
from .records import ChatCall, RequestState
from .runtime import Runtime

if TYPE_CHECKING:
    from .gateway import Gateway

perf = time.perf_counter


async def stream_attempts(gw: "Gateway", rt: Runtime, call: ChatCall, ctx: RequestState):
    """The attempts of one streamed request; see Gateway.chat_stream for the events."""
    ok, last_kind = False, None
    try:
        gw._plan(rt, ctx)
        why = "; ".join(ctx.plan.reasons) or "budget too small"
        for att, window, dep, req, trimmed in gw._each_attempt(rt, call, ctx):
            stats = StreamStats()
            t_a = stats.t_start
            gen = rt.providers[att.target].stream(req, stats)
            first, failed = "", None
            try:
                first = await within(gen.__anext__(), window)
            except StopAsyncIteration:
                pass
            except asyncio.TimeoutError:
                failed = ("timeout", f"{dep.name} sent nothing within {window * 1000:.0f} ms")
            except ProviderError as exc:
                failed = (exc.kind, str(exc))
            except Exception as exc:  # noqa: BLE001
                failed = ("error", f"{type(exc).__name__}: {exc}")
            if failed is not None:
                last_kind, why = failed
                await gen.aclose()
                gw._failed(rt, ctx, att, last_kind, t_a, why, window, call.trace_id)
                continue  # the next deployment, or give up after the last
            ok = att.target == "active"
            parts = [first]
            finish = None
            closed = True  # until the stream ends on its own: a client that leaves is charged for what it got
            try:
                yield "start", dep
                if first:
                    yield "delta", first
                while True:
                    left = ctx.deadline - perf()
                    try:
                        piece = await within(gen.__anext__(), max(0.0, left))
                    except StopAsyncIteration:
                        break
                    parts.append(piece)
                    yield "delta", piece
                closed = False
            except asyncio.TimeoutError:
                closed = False
                finish = "length"
                gw.metrics.budget_exhausted.labels(call.route).inc()
            except Exception as exc:  # noqa: BLE001 - mid-stream failure: the answer is already half out
                ok, closed = False, False
                gw._failed(rt, ctx, att, getattr(exc, "kind", "error"), t_a, str(exc), window, call.trace_id)
                yield "error", f"upstream failed mid-answer; the gateway log has the details under trace id {call.trace_id}"
                return
            finally:
                if closed:
                    _charge_partial(gw, rt, call, ctx, dep, req, parts)
                await gen.aclose()
            text = "".join(parts)
            t1 = stats.t_first or perf()
            res = GenResult(text, stats.tokens_in or estimate_tokens(req.prompt()),
                            stats.tokens_out or estimate_tokens(text), finish or stats.finish_reason,
                            ttft_ms=(t1 - t_a) * 1000, generation_ms=(perf() - t1) * 1000)
            yield "end", gw._succeeded(rt, call, ctx, att, res, trimmed, t_a, cut=finish is not None)
            return
        raise gw._give_up(rt, call, ctx, last_kind, why)
    finally:
        gw._probe_done(ctx, ok)


def _charge_partial(gw: "Gateway", rt: Runtime, call: ChatCall, ctx: RequestState, dep, req, parts: list[str]) -> None:
    """The client left mid-answer (GeneratorExit or cancellation): it is charged for the prompt and
    for the pieces it was sent, and the request is recorded as `client_closed`, not as an error."""
    tokens_in, tokens_out = estimate_tokens(req.prompt()), estimate_tokens("".join(parts)) if parts else 0
    ctx.used_tokens = tokens_in + tokens_out
    ctx.used_usd = (dep.price or rt.serving.price).cost(tokens_in, tokens_out)
    gw._client_closed(rt, call, ctx)
