"""The load-test client contract every speed measurement goes through.

A client turns one GenerationRequest into a stream of text chunks; the load generator, not
the client, holds the clock (TTFT, inter-token gaps, E2E), so every backend is timed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class GenerationRequest:
    id: str
    messages: list[dict]  # OpenAI chat messages
    max_tokens: int
    kind: str = ""  # the workload's length class, e.g. "short" / "long"
    ignore_eos: bool = True  # load tests want the asked-for output length
    greedy: bool = False  # the regression set grades greedy answers (a server samples unless told)


@dataclass
class Chunk:
    """A piece of streamed output. The last chunk may carry the engine's own token counts."""

    text: str = ""
    tokens: int | None = None  # tokens in this chunk if the engine knows (in-process: yes)
    usage: dict | None = None  # {"prompt_tokens": n, "completion_tokens": m} at the end


class Client(Protocol):
    """The caller starts the client before use and closes it after (the load generator does neither)."""

    name: str

    async def start(self) -> None: ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def close(self) -> None: ...

