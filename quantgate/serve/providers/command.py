"""A command-line model client as a provider (the chapter's gemini CLI example).

The manifest gives an argv template; '{prompt}' in any argument is replaced by the prompt (no
shell, so no quoting problems and no injection), or the prompt goes to stdin. stdout is the answer.

What a prompt may not do to the command line:
- be read as an option: a prompt starting with '-' in an argument of its own is refused unless
  the template has '--' before it (or uses stdin);
- carry a NUL byte (no argv can), or exceed what one argument may hold (Linux: 128 KiB) — a
  clear 400 naming stdin: true as the fix, not an upstream failure.
The command runs in its own process group: on a timeout, or when the request's deadline passes,
the whole group is killed (grandchildren too, which otherwise keep the pipes open), and the
wait for it is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time

from ...procs import child_environ
from .base import GenRequest, GenResult, Provider, ProviderError, estimate_tokens

log = logging.getLogger("quantgate.serve")
MAX_ARG_BYTES = 100_000   # below Linux's MAX_ARG_STRLEN (128 KiB), with room for the rest of argv
MAX_OUTPUT_BYTES = 4 << 20
KILL_WAIT_S = 2.0


def prompt_problem(argv: list[str], stdin: bool, prompt: str) -> str | None:
    """Why this prompt cannot be given to this command; None when it can. Pure."""
    if "\x00" in prompt:
        return "the prompt contains a NUL byte, which a command line cannot carry"
    if stdin:
        return None
    if len(prompt.encode()) > MAX_ARG_BYTES:
        return (f"the prompt is larger than one command-line argument may be ({MAX_ARG_BYTES} bytes); "
                "the manifest should send it on stdin (stdin: true)")
    if prompt.startswith("-"):
        for i, a in enumerate(argv):
            if a.startswith("{prompt}") and "--" not in argv[:i]:
                return ("the prompt starts with '-', which this command would read as an option; "
                        "the manifest should put '--' before '{prompt}' or use stdin: true")
    return None


class CommandProvider(Provider):
    kind = "command"

    async def ready(self) -> tuple[bool, str]:
        exe = self.spec.argv[0]
        found = shutil.which(exe) or (os.path.isfile(exe) and os.access(exe, os.X_OK))
        return (True, f"{os.path.basename(exe)} found") if found else (False, f"{os.path.basename(exe)}: not found")

    async def generate(self, req: GenRequest) -> GenResult:
        prompt = req.prompt()
        problem = prompt_problem(self.spec.argv, self.spec.stdin, prompt)
        if problem:
            raise ProviderError("invalid", problem)
        argv = [a.replace("{prompt}", prompt) for a in self.spec.argv]
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if self.spec.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
                limit=MAX_OUTPUT_BYTES, env=child_environ(engine=False),  # without the gateway's own keys
            )
        except OSError as exc:
            raise ProviderError("unavailable", f"cannot start {argv[0]}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(prompt.encode() if self.spec.stdin else None), self.spec.timeout_s)
        except asyncio.TimeoutError:
            await kill_group(proc)
            raise ProviderError("error", f"{argv[0]} did not finish within timeout_s={self.spec.timeout_s}") from None
        except BaseException:  # cancelled by the request's deadline: do not leave the processes behind
            await kill_group(proc)
            raise
        elapsed = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-300:]
            raise ProviderError("error", f"{argv[0]} exited with {proc.returncode}: {tail}")  # logged, never sent
        text = out[:MAX_OUTPUT_BYTES].decode(errors="replace").strip()
        return GenResult(text=text, tokens_in=estimate_tokens(prompt), tokens_out=estimate_tokens(text),
                         ttft_ms=elapsed, generation_ms=0.0)


async def kill_group(proc: asyncio.subprocess.Process, wait_s: float = KILL_WAIT_S) -> None:
    """Kill the command and everything it started (its own session), then wait at most `wait_s`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), wait_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        log.warning("command %d did not exit within %.1f s of SIGKILL", proc.pid, wait_s)
