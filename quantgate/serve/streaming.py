"""Streaming answers: the same attempts as a plain answer, but committed at the first piece.

Before the first piece arrives, a slow or failing deployment is abandoned for the next one in the
plan exactly as for a plain answer. Once a piece has been sent to the client the deployment is
fixed: the request's deadline then cuts the answer short (finish_reason 'length') instead of
starting again elsewhere, and an upstream failure ends the stream with an error event. However a
stream ends, the request is charged what the upstream did (serve/charges.py) before its
reservation settles: Gateway.chat_stream closes this generator inside the request's opening.
"""

from __future__ import annotations

import asyncio
import time

from .attempts import Attempts
from .providers import GenResult, ProviderError, StreamStats
from .providers.base import estimate_tokens, within

perf = time.perf_counter


async def stream_answer(a: Attempts):
    """The attempts of one streamed request; see Gateway.chat_stream for the events."""
    rt, call, ctx = a.rt, a.call, a.ctx
    ok, last_kind = False, None
    try:
        why = a.plan()
        for att, window, dep, req, trimmed in a.each():
            stats = StreamStats()
            t_a = stats.t_start
            gen = rt.providers[att.target].stream(req, stats)
            first, failed = "", None
            try:
                first = await within(gen.__anext__(), window)
            except StopAsyncIteration:
                pass
            except asyncio.CancelledError:  # the client left while the upstream worked on its prompt
                a.charge(dep, "client_closed", stats.tokens_in or ctx.tokens_in, stats.tokens_out)
                await gen.aclose()
                raise
            except asyncio.TimeoutError:
                failed = ("timeout", f"{dep.name} sent nothing within {window * 1000:.0f} ms")
            except ProviderError as exc:
                failed = (exc.kind, str(exc))
            except Exception as exc:  # noqa: BLE001
                failed = ("error", f"{type(exc).__name__}: {exc}")
            if failed is not None:
                last_kind, why = failed
                await gen.aclose()
                a.failed(att, last_kind, t_a, why, window)
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
                a.metrics.budget_exhausted.labels(call.route).inc()
            except Exception as exc:  # noqa: BLE001 - mid-stream failure: the answer is already half out
                ok, closed = False, False
                _charge_sent(a, dep, stats, parts, "failed_mid_answer")  # the client has what was sent
                a.failed(att, getattr(exc, "kind", "error"), t_a, str(exc), window)
                yield "error", f"upstream failed mid-answer; the gateway log has the details under trace id {call.trace_id}"
                return
            finally:
                if closed:
                    _charge_sent(a, dep, stats, parts, "client_closed")
                    a.client_closed()
                await gen.aclose()
            text = "".join(parts)
            t1 = stats.t_first or perf()
            res = GenResult(text, stats.tokens_in or estimate_tokens(req.prompt()),
                            stats.tokens_out or estimate_tokens(text), finish or stats.finish_reason,
                            ttft_ms=(t1 - t_a) * 1000, generation_ms=(perf() - t1) * 1000)
            yield "end", a.succeeded(att, res, trimmed, t_a, cut=finish is not None)
            return
        raise a.give_up(last_kind, why)
    finally:
        a.probe_done(ok)


def _charge_sent(a: Attempts, dep, stats: StreamStats, parts: list[str], ended: str) -> None:
    """A stream that ended before its end (the client left, GeneratorExit or cancellation, or the
    upstream failed mid-answer): charged for the prompt and for what the upstream produced (its own
    count when it gave one, else the pieces), the same in tokens and USD."""
    text = "".join(parts)
    a.charge(dep, ended, stats.tokens_in or a.ctx.tokens_in,
             max(stats.tokens_out, estimate_tokens(text) if text else 0))
