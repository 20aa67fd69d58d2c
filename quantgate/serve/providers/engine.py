"""A deployment whose engine the gateway starts (vLLM, llama.cpp): the `openai` provider pointed at
the supervised process's loopback port, ready only while that engine is.

`start()` acquires the engine from the supervisor (at the gateway's start in the background, on a
reload only once it is ready and answered a probe: blue/green); `close()` releases it, which stops
the process after its last user.
"""

from __future__ import annotations

from typing import AsyncIterator

from yarl import URL

from .base import GenRequest, GenResult, ProviderError, StreamStats
from .openai_compat import OpenAIProvider


class EngineProvider(OpenAIProvider):
    kind = "engine"

    def __init__(self, deployment, supervisor, wait: bool):
        super().__init__(deployment)
        self.supervisor, self.wait = supervisor, wait
        self.engine = None

    async def start(self) -> None:
        self.engine = await self.supervisor.acquire(self.deployment, self.wait)
        self.headers.update(self.engine.auth)  # the engine's per-engine secret: it refuses anyone else
        base = f"{self.engine.base_url}/v1"
        self.spec = self.spec.model_copy(update={"base_url": base})
        self.url = URL(f"{base}/chat/completions")
        try:
            await super().start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await super().close()
        engine, self.engine = self.engine, None
        if engine is not None:
            await self.supervisor.release(self.deployment)

    async def generate(self, req: GenRequest) -> GenResult:
        try:
            return await super().generate(req)
        except ProviderError:
            self._suspect()
            raise

    async def stream(self, req: GenRequest, stats: StreamStats) -> AsyncIterator[str]:
        try:
            async for piece in super().stream(req, stats):
                yield piece
        except ProviderError:
            self._suspect()
            raise

    def _suspect(self) -> None:
        if self.engine is not None:
            self.supervisor.suspect(self.engine)

    @property
    def available(self) -> bool:
        return self.engine is not None and self.engine.ready

    async def ready(self) -> tuple[bool, str]:
        e = self.engine
        if e is None:
            return False, "engine stopped"
        if not e.ready:
            return False, f"engine {e.life.state}" + (f": {e.life.error}" if e.life.error else "")
        return await super().ready()
