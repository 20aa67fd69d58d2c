"""The async streaming load generator: send a workload to an engine, time every chunk.

    report = await run_load(engine, workload, PromptSource(texts))

The generator holds the clock, not the engine, so every engine is timed the same way: a
request's clock starts just before `engine.stream(req)` is called and every chunk is stamped
as it arrives. Arrivals are one of
  concurrency  N workers, each sending its next request as soon as the last one finished
  poisson      exponential inter-arrival gaps with mean 1/rate
  burst        gamma gaps (shape `burstiness`, mean 1/rate): shape < 1 clusters arrivals
and all of them keep at most `concurrency` requests in flight (an arrival waits for a free
slot, as a client with a bounded connection pool would). Sending stops after `requests`
measured requests or after `duration_s`, whichever comes first; requests already in flight
are then awaited. `warmup_requests` go first and are reported apart, never aggregated.

The sequence of request kinds (the long/short mix) and of arrival gaps come from RNGs seeded
by `workload.seed`, so two runs of one workload send the same requests at the same offsets.
The engine's lifecycle (start/close) belongs to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import QuantgateError
from ..workload import LengthClass, WorkloadSpec
from .clients.base import Client, GenerationRequest
from .stats import Aggregates, RequestRecord, aggregate, tpot_of

__all__ = ["PromptSource", "RequestRecord", "LoadReport", "run_load", "kind_sequence", "arrival_offsets"]

CHARS_PER_TOKEN = 4.0  # the usual English estimate when no tokenizer is given


# ------------------------------------------------------------------------------ prompts
class PromptSource:
    """Prompt text of about N tokens, cut from a pool of texts.

    Request i starts at a different place in the pool (a prime stride through its words), so
    prompts differ and a server's prefix cache does not turn the load test into a cache test.
    `count_tokens(text) -> int` is any tokenizer-like callable; without one, ~4 chars/token.
    """

    def __init__(self, texts: Sequence[str], count_tokens: Callable[[str], int] | None = None,
                 *, origin: str = "the prompt texts"):
        self._words = [w for t in texts if t for w in str(t).split()]
        if not self._words:
            raise QuantgateError(f"{origin}: no prompt text (every text is empty)")
        self.count_tokens = count_tokens
        self.origin = origin

    @classmethod
    def from_jsonl(cls, path: str | Path, count_tokens: Callable[[str], int] | None = None,
                   field_name: str = "prompt") -> "PromptSource":
        """Texts from a JSONL file whose rows carry the text in `field_name`."""
        from .prompts import jsonl_prompts

        return cls(jsonl_prompts(path, field_name), count_tokens, origin=str(Path(path).expanduser()))

    def estimate_tokens(self, text: str) -> int:
        if self.count_tokens is not None:
            return int(self.count_tokens(text))
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    def _take(self, start: int, k: int) -> str:
        n = len(self._words)
        return " ".join(self._words[(start + j) % n] for j in range(k))

    def prompt(self, n_tokens: int, index: int = 0) -> str:
        """About `n_tokens` tokens of text; deterministic in (n_tokens, index)."""
        start = (index * 7919) % len(self._words)
        if self.count_tokens is None:
            # accumulate words until the ~4 chars/token estimate reaches the target
            chars, k, budget = 0, 0, n_tokens * CHARS_PER_TOKEN
            while chars < budget:
                chars += len(self._words[(start + k) % len(self._words)]) + 1
                k += 1
            return self._take(start, max(k, 1))
        # with a tokenizer: grow an upper bound, then bisect the word count to the closest
        hi = max(1, n_tokens)
        while self.estimate_tokens(self._take(start, hi)) < n_tokens and hi < 1 << 20:
            hi *= 2
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.estimate_tokens(self._take(start, mid)) < n_tokens:
                lo = mid + 1
            else:
                hi = mid
        best = lo
        if lo > 1 and (n_tokens - self.estimate_tokens(self._take(start, lo - 1))
                       < self.estimate_tokens(self._take(start, lo)) - n_tokens):
            best = lo - 1
        return self._take(start, best)


    def exact(self, n_tokens: int, index: int = 0) -> str:
        """Text of exactly `n_tokens` by the ~4 chars/token estimate (a trace's recorded count comes
        back as recorded from a gateway that estimates); with a tokenizer, as close as `prompt`."""
        if self.count_tokens is not None:
            return self.prompt(n_tokens, index)
        k = int(n_tokens * CHARS_PER_TOKEN)
        text = self.prompt(n_tokens + 1, index)[:k]  # n+1 tokens of words are always longer than k chars
        return text[:-1] + "." if text.endswith(" ") else text


# ------------------------------------------------------------------ pure request plans
MIX_BLOCK = 10


def kind_sequence(mix: Sequence[LengthClass], seed: int, stream: str = "mix",
                  block: int = MIX_BLOCK) -> Iterator[LengthClass]:
    """An endless, seeded sequence of length classes in the mix's proportions.

    Allocated, not drawn: every block of `block` requests holds each class in proportion to its
    weight (fractions carried to the next block), shuffled by the seed. Independent draws gave a
    12-request test of a 70/30 mix 12 short requests and no long one.
    """
    rng = random.Random(f"{stream}:{seed}")  # str seeds are hashed deterministically
    total = sum(c.weight for c in mix)
    owed = [0.0] * len(mix)
    while True:
        owed = [o + c.weight / total * block for o, c in zip(owed, mix)]
        counts = [int(o) for o in owed]
        by_fraction = sorted(range(len(mix)), key=lambda i: (owed[i] - counts[i], -i), reverse=True)
        for i in by_fraction[: block - sum(counts)]:
            counts[i] += 1
        owed = [o - n for o, n in zip(owed, counts)]
        batch = [c for c, n in zip(mix, counts) for _ in range(n)]
        rng.shuffle(batch)
        yield from batch


def arrival_times(arrival: str, rate: float | None, burstiness: float, seed: int) -> Iterator[float]:
    """Seeded send offsets (s) for rate-driven arrivals: 0 first, then gamma-distributed gaps
    with mean 1/rate (shape 1 for poisson, `burstiness` for burst)."""
    if arrival not in ("poisson", "burst") or not rate or rate <= 0:
        raise ValueError(f"arrival '{arrival}' has no rate-driven schedule (rate={rate})")
    shape = 1.0 if arrival == "poisson" else burstiness
    scale = 1.0 / (rate * shape)
    rng = random.Random(f"arrival:{seed}")
    t = 0.0
    while True:
        yield t
        t += rng.gammavariate(shape, scale)


def arrival_offsets(workload: WorkloadSpec, n: int) -> list[float]:
    """The first `n` send offsets the workload's rate-driven arrival process produces."""
    it = arrival_times(workload.arrival, workload.rate, workload.burstiness, workload.seed)
    return [next(it) for _ in range(n)]


def make_request(prefix: str, index: int, kind: LengthClass, prompts: PromptSource,
                 exact: bool = False) -> tuple[GenerationRequest, int]:
    text = (prompts.exact if exact else prompts.prompt)(kind.prompt_tokens, index)
    req = GenerationRequest(id=f"{prefix}{index:06d}", messages=[{"role": "user", "content": text}],
                            max_tokens=kind.output_tokens, kind=kind.name, ignore_eos=True)
    return req, prompts.estimate_tokens(text)


def trace_plan(workload: WorkloadSpec) -> tuple[list[LengthClass], list[float]]:
    """A trace workload's requests (one length class each: the recorded prompt tokens, and the
    recorded output tokens as max_tokens) and their send offsets (recorded arrivals × time_scale)."""
    from ..workload import read_trace

    entries = read_trace(workload.trace)
    kinds = [LengthClass(name="trace", prompt_tokens=max(1, e["prompt_tokens"]),
                         output_tokens=max(1, e["output_tokens"] or e["max_tokens"] or 1)) for e in entries]
    t_first = entries[0]["t"]
    return kinds, [(e["t"] - t_first) * workload.time_scale for e in entries]


# ----------------------------------------------------------------------- measurement
def _deadline(seconds: float):
    """asyncio.timeout on Python 3.11+, async_timeout (an aiohttp dependency) before."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    import async_timeout  # pragma: no cover - Python 3.10

    return async_timeout.timeout(seconds)  # pragma: no cover


def _expired(cm) -> bool:
    e = cm.expired  # a method on asyncio.Timeout, a property on async_timeout's
    return bool(e() if callable(e) else e)


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    return msg if msg and type(exc).__module__.startswith("quantgate") else f"{type(exc).__name__}: {msg or repr(exc)}"


async def measure(engine: Client, req: GenerationRequest, *, timeout_s: float, t0: float,
                  clock: Callable[[], float] = time.perf_counter, tokens_in: int | None = None) -> RequestRecord:
    """Send one request and time it. Never raises for the request's own failure: an engine
    exception becomes outcome 'error', running past `timeout_s` outcome 'timeout'."""
    rec = RequestRecord(id=req.id, kind=req.kind, tokens_in=tokens_in)
    first = last = None
    counted = 0
    usage: dict | None = None
    limit = _deadline(timeout_s)
    start = clock()
    rec.start_s = start - t0
    try:
        async with limit:
            stream = engine.stream(req)
            closer = contextlib.aclosing(stream) if hasattr(stream, "aclose") else contextlib.nullcontext(stream)
            async with closer:
                async for chunk in stream:
                    now = clock()
                    if chunk.text:
                        if first is None:
                            first = now
                            rec.ttft_s = now - start
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        counted += chunk.tokens if chunk.tokens is not None else 1
                    if chunk.usage:
                        usage = chunk.usage
        end = clock()
    except asyncio.TimeoutError as exc:  # ours, or the engine's own read timeout
        rec.outcome = "timeout"
        rec.error = (f"no complete response within {timeout_s:g} s" if _expired(limit)
                     else f"the engine timed out: {_describe(exc)}")
        return rec
    except Exception as exc:  # an engine failure is a measurement, not a crash of the run
        rec.outcome, rec.error = "error", _describe(exc)
        return rec
    out = (usage or {}).get("completion_tokens")
    rec.tokens_out = int(out) if isinstance(out, (int, float)) else counted
    pin = (usage or {}).get("prompt_tokens")
    if isinstance(pin, (int, float)):
        rec.tokens_in = int(pin)
    if first is None:
        rec.outcome, rec.error = "error", "the stream ended without any output text"
        return rec
    rec.e2e_s = end - start
    rec.tpot_s = tpot_of(rec.e2e_s, rec.ttft_s, rec.tokens_out)
    return rec


async def _all_or_cancel(tasks: list[asyncio.Task]) -> None:
    """Await every task; if one fails (or the run is cancelled), cancel the rest first."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# --------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    workload: WorkloadSpec
    engine: str
    records: list[RequestRecord]
    wall_s: float
    aggregates: Aggregates
    warmup: list[RequestRecord] = field(default_factory=list)
    target: str | None = None  # where the engine sends (a URL), if it says
    model: str | None = None
    started_at: str = ""

    def to_dict(self) -> dict:
        return {
            "engine": self.engine, "target": self.target, "model": self.model, "started_at": self.started_at,
            "workload": self.workload.model_dump(mode="json"), "wall_s": self.wall_s,
            "aggregates": self.aggregates.to_dict(),
            "records": [r.to_dict() for r in self.records],
            "warmup": [r.to_dict() for r in self.warmup],
        }


# -------------------------------------------------------------------------- the run
async def run_load(engine: Client, workload: WorkloadSpec, prompts: PromptSource | Sequence[str], *,
                   progress: Callable[[int, int | None], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], object] = asyncio.sleep) -> LoadReport:
    """Run `workload` against a started `engine` and return the measured report.

    `progress(done, total)` is called after each measured request (total None for a
    duration-bound run). `clock` and `sleep` are injectable so arrival schedules can be checked
    in virtual time.
    """
    src = prompts if isinstance(prompts, PromptSource) else PromptSource(list(prompts))
    cap, n, dur, timeout = workload.concurrency, workload.requests, workload.duration_s, workload.timeout_s
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # a trace says every request and when it arrives; requests, duration_s, mix and arrival do not apply
    traced, offsets = trace_plan(workload) if workload.trace else (None, None)
    if traced is not None:
        n, dur = len(traced), None
    # warm-up: its own kind stream, so the measured sequence depends on the seed alone
    warm_kinds = (iter(traced * (workload.warmup_requests // len(traced) + 1)) if traced is not None
                  else kind_sequence(workload.mix, workload.seed, stream="warmup"))
    warm_reqs = [make_request("w", i, next(warm_kinds), src, traced is not None)
                 for i in range(workload.warmup_requests)]
    warmup: list[RequestRecord] = []
    if warm_reqs:
        gate = asyncio.Semaphore(cap)
        w0 = clock()

        async def _warm(req, tin):
            async with gate:
                return await measure(engine, req, timeout_s=timeout, t0=w0, clock=clock, tokens_in=tin)

        warmup = list(await asyncio.gather(*(_warm(r, t) for r, t in warm_reqs)))

    kinds = iter(traced) if traced is not None else kind_sequence(workload.mix, workload.seed)
    planned = [make_request("r", i, next(kinds), src, traced is not None) for i in range(n)] if n is not None else None

    def request(i: int):
        # called in index order, at dispatch, so a duration-bound run draws the same sequence
        return planned[i] if planned is not None else make_request("r", i, next(kinds), src)

    records: dict[int, RequestRecord] = {}
    t0 = clock()

    def more(i: int) -> bool:
        return (n is None or i < n) and (dur is None or clock() - t0 < dur)

    async def one(i: int, planned_req) -> None:
        req, tin = planned_req
        records[i] = await measure(engine, req, timeout_s=timeout, t0=t0, clock=clock, tokens_in=tin)
        if progress is not None:
            progress(len(records), n)

    if workload.arrival == "concurrency" and traced is None:
        counter = iter(range(1 << 62))

        async def worker() -> None:
            while True:
                i = next(counter)
                if not more(i):
                    return
                await one(i, request(i))

        await _all_or_cancel([asyncio.ensure_future(worker()) for _ in range(cap)])
    else:
        slots = asyncio.Semaphore(cap)
        tasks: list[asyncio.Task] = []

        async def send(i: int, planned_req) -> None:
            try:
                await one(i, planned_req)
            finally:
                slots.release()

        async def dispatch() -> None:
            times = offsets if offsets is not None else arrival_times(workload.arrival, workload.rate,
                                                                      workload.burstiness, workload.seed)
            for i, offset in enumerate(times):
                if (n is not None and i >= n) or (dur is not None and offset >= dur):
                    return
                delay = t0 + offset - clock()
                if delay > 0:
                    await sleep(delay)
                await slots.acquire()  # at the cap, the arrival waits for a free slot
                tasks.append(asyncio.ensure_future(send(i, request(i))))

        try:
            await dispatch()
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        await _all_or_cancel(tasks)
    wall = clock() - t0

    measured = [records[i] for i in sorted(records)]
    return LoadReport(
        workload=workload, engine=getattr(engine, "name", type(engine).__name__), records=measured, wall_s=wall,
        aggregates=aggregate(measured, wall, workload.slo), warmup=warmup,
        target=getattr(engine, "base_url", None), model=getattr(engine, "model", None), started_at=started_at,
    )
