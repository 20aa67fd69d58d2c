"""Budgets nobody can slip by how a request ends (issue 19, finding 3 and 8's mid-stream failure):
whatever way a request ends, it is charged what the upstream did (its prompt once an upstream took
it, and the output produced), in tokens and in USD alike, and its reservation and rate bucket
settle to exactly that. A real Gateway in this test's event loop, with a scripted provider; a
frozen clock, so the token bucket does not refill while we look at it."""

from __future__ import annotations

import asyncio
import time

import pytest
from gwkit import base_manifest, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantgate.serve.charges import charged
from quantgate.serve.gateway import Gateway
from quantgate.serve.guards.input_size import prompt_tokens
from quantgate.serve.providers import GenResult, Provider, ProviderError
from quantgate.serve.records import ChatCall, GatewayError

MESSAGES = [{"role": "user", "content": "tell me everything"}]
PROMPT = prompt_tokens(MESSAGES)
OUT = 6  # tokens in a whole answer
BUCKET = 10**9
SERVING = {"cache": {"enabled": False}, "default_budget_ms": 300,
           "price": {"input_per_1m": 1e6, "output_per_1m": 1e6},  # $1 a token: USD must equal tokens
           "budgets": {"tenants": {"*": {"tokens": 10**12}}},
           "tenant_limits": {"*": {"tokens_per_min": BUCKET}}, "ladder": {"enabled": False}}


class Scripted(Provider):
    """Behaves as `script[role]` says: ok, hang (the budget runs out), error, rejected, or
    mid (a stream that fails after two pieces; a plain answer that fails). Records entries."""

    kind = "scripted"

    def __init__(self, deployment, role: str, script: dict, entered: list):
        super().__init__(deployment)
        self.role, self.script, self.entered = role, script, entered

    async def _begin(self) -> str:
        how = self.script[self.role]
        self.entered.append((self.role, how))
        if how == "hang":
            await asyncio.sleep(30)
        if how in ("error", "mid"):
            raise ProviderError("error", "upstream 503")
        if how == "rejected":
            raise ProviderError("rejected", "upstream 400")
        return how

    async def generate(self, req):
        await self._begin()
        return GenResult("w " * OUT, PROMPT, OUT)

    async def stream(self, req, stats):
        how = self.script[self.role]
        if how == "mid":
            self.entered.append((self.role, how))
            stats.tokens_in = PROMPT
            for i in range(2):
                stats.tokens_out = i + 1
                yield "w "
            raise ProviderError("error", "upstream reset mid-answer")
        await self._begin()
        stats.tokens_in = PROMPT
        for i in range(OUT):
            stats.tokens_out = i + 1
            if stats.t_first is None:
                stats.t_first = time.perf_counter()
            yield "w "
            await asyncio.sleep(0)


class Rig:
    """One gateway for many requests: what each request charged is the ledger's and bucket's change."""

    def __init__(self, tmp_path):
        self.gw = Gateway(write(tmp_path / "manifest.json", base_manifest(**SERVING)), clock=lambda: 1000.0)
        self.script: dict = {}
        self.entered: list = []

    async def __aenter__(self) -> "Rig":
        await self.gw.start()
        rt = self.gw.rt
        for role in ("active", "fallback"):
            rt.providers[role] = Scripted(rt.deployment(role), role, self.script, self.entered)
        return self

    async def __aexit__(self, *exc):
        await self.gw.close()

    def totals(self) -> tuple[int, float, int, float, float]:
        u = self.gw.ledger.usage("tenant:acme")
        t = self.gw.limiter._t.get("acme")
        return (u.tokens if u else 0, u.usd if u else 0.0, u.reserved_tokens if u else 0,
                u.reserved_usd if u else 0.0, t.tok if t else float(BUCKET))

    async def run(self, stream: bool, leave: str | None = None, after: int = 0):
        """One request; `leave`: 'cancel' (the client's task is cancelled once an upstream is entered),
        'close' (the HTTP layer closes the stream after `after` deltas). Returns what it charged."""
        before = self.totals()
        self.entered.clear()
        c = ChatCall("openai", "t", "acme", None, MESSAGES, time.perf_counter())

        async def ask():
            if not stream:
                return await self.gw.chat(c)
            events = self.gw.chat_stream(c)
            deltas = 0
            try:
                async for kind, val in events:
                    if kind == "delta":
                        deltas += 1
                        if leave == "close" and deltas >= after:
                            return "closed"
            finally:
                await events.aclose()  # what app._stream does, also when cancelled mid-write

        task = asyncio.ensure_future(ask())
        if leave == "cancel":
            while not self.entered and not task.done():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.005)
            task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        after_ = self.totals()
        return outcome, tuple(a - b for a, b in zip(after_, before))


def one(tmp_path, active: str, fallback: str, stream: bool, leave: str | None = None, after: int = 0):
    """One request on a fresh rig: (its outcome, what it charged, the attempts the upstreams saw)."""
    async def main():
        async with Rig(tmp_path) as rig:
            rig.script.update(active=active, fallback=fallback)
            outcome, charges = await rig.run(stream, leave, after)
            return outcome, charges, list(rig.entered)
    return asyncio.run(main())


# ------------------------------------------------------------------------------ the audit's cases
def test_a_stream_cut_while_the_gateway_writes_to_the_client_is_charged_what_was_sent(tmp_path):
    """(a) The HTTP layer closes the stream (a client gone while a write blocked): the request's
    opening settled before the partial answer was charged: 0 tokens after 2 chunks."""
    outcome, (tokens, usd, held, held_usd, bucket), _ = one(tmp_path, "ok", "ok", True, "close", after=2)
    assert outcome == "closed" and (held, held_usd) == (0, 0)
    assert tokens >= PROMPT + 2 and usd == tokens and bucket == -tokens


def test_a_plain_request_whose_client_leaves_is_charged_its_prompt_in_usd_too(tmp_path):
    """(b) Charged tokens but never USD."""
    outcome, (tokens, usd, held, _, bucket), _ = one(tmp_path, "hang", "hang", False, "cancel")
    assert isinstance(outcome, asyncio.CancelledError) and held == 0
    assert tokens == PROMPT and usd == PROMPT and bucket == -PROMPT


def test_a_504_budget_exhausted_is_charged_the_prompts_the_upstreams_worked_on(tmp_path):
    """(c) It charged nothing and refunded the whole rate-bucket reservation."""
    outcome, (tokens, usd, held, _, bucket), entered = one(tmp_path, "hang", "hang", False)
    assert isinstance(outcome, GatewayError) and outcome.status == 504 and held == 0
    worked = sum(1 for _, how in entered if how == "hang")
    assert worked >= 1 and tokens == PROMPT * worked and usd == tokens and bucket == -tokens


def test_a_stream_that_fails_upstream_mid_answer_is_charged_what_was_sent(tmp_path):
    _, (tokens, usd, held, _, bucket), _ = one(tmp_path, "mid", "ok", True)
    assert held == 0 and tokens >= PROMPT + 2 and usd == tokens and bucket == -tokens


def test_an_upstream_that_fails_before_taking_the_prompt_costs_nothing():
    assert charged("error", 10, 0) == (0, 0) and charged("rejected", 10, 0) == (0, 0)
    assert charged("timeout", 10, 0) == (10, 0) and charged("client_closed", 10, 3) == (10, 3)
    assert charged("something new", 10, 1) == (10, 1)  # an unknown way of ending is not free


# ------------------------------------------------------------------------------ every way a request ends
BEHAVIOURS = st.sampled_from(["ok", "hang", "error", "rejected", "mid"])


@pytest.fixture(scope="module")
def rig_loop(tmp_path_factory):
    """One rig on one event loop for every example (a gateway per example would dominate)."""
    loop = asyncio.new_event_loop()
    rig = Rig(tmp_path_factory.mktemp("charges"))
    loop.run_until_complete(rig.__aenter__())
    yield rig, loop
    loop.run_until_complete(rig.__aexit__(None, None, None))
    loop.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(active=BEHAVIOURS, fallback=BEHAVIOURS, stream=st.booleans(),
       leave=st.sampled_from([None, "cancel", "close"]), after=st.integers(1, 4))
def test_every_way_a_request_ends_charges_what_the_upstream_did_in_every_currency(rig_loop, active, fallback, stream,
                                                                                  leave, after):
    rig, loop = rig_loop
    rig.script.update(active=active, fallback=fallback)
    if leave == "close" and not stream:
        leave = None
    outcome, (tokens, usd, held, held_usd, bucket) = loop.run_until_complete(rig.run(stream, leave, after))
    entered = list(rig.entered)
    took = [how for _, how in entered if how in ("ok", "hang") or (how == "mid" and stream)]
    assert (held, held_usd) == (0, 0), "the reservation settled"
    assert usd == tokens, "USD charged exactly as tokens ($1 a token)"
    assert bucket == -tokens, "the rate bucket keeps exactly what was charged"
    if not took:  # no upstream took the prompt: nothing is owed (a client that left meanwhile included)
        assert tokens == 0, (entered, outcome)
    else:
        assert tokens >= PROMPT, (entered, outcome)
        assert tokens <= len(took) * (PROMPT + OUT), (entered, outcome)
    if not isinstance(outcome, BaseException) and outcome not in ("closed", None):
        assert tokens >= PROMPT + outcome.tokens_out  # an answer is charged its prompt and output
