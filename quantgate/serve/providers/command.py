"""A command-line model client as a provider (the chapter's gemini CLI example).

The manifest gives an argv template; '{prompt}' in any argument is replaced by the prompt (no
shell, so no quoting problems and no injection), or the prompt goes to stdin. stdout is the answer.
The process is killed when its own timeout or the request's deadline passes, so a hung CLI never
holds a slot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

from .base import GenRequest, GenResult, Provider, ProviderError, estimate_tokens


class CommandProvider(Provider):
    kind = "command"

    async def ready(self) -> tuple[bool, str]:
        exe = self.spec.argv[0]
        found = shutil.which(exe) or (os.path.isfile(exe) and os.access(exe, os.X_OK))
        return (True, f"{exe} found") if found else (False, f"{exe}: not found on PATH")

    async def generate(self, req: GenRequest) -> GenResult:
        prompt = req.prompt()
        argv = [a.replace("{prompt}", prompt) for a in self.spec.argv]
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if self.spec.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ProviderError("unavailable", f"cannot start {argv[0]}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(prompt.encode() if self.spec.stdin else None), self.spec.timeout_s)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise ProviderError("error", f"{argv[0]} did not finish within timeout_s={self.spec.timeout_s}") from None
        except BaseException:  # cancelled by the request's deadline: do not leave the process behind
            await _kill(proc)
            raise
        elapsed = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-300:]
            raise ProviderError("error", f"{argv[0]} exited with {proc.returncode}: {tail}")
        text = out.decode(errors="replace").strip()
        return GenResult(text=text, tokens_in=estimate_tokens(prompt), tokens_out=estimate_tokens(text),
                         ttft_ms=elapsed, generation_ms=0.0)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()
