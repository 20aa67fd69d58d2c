"""A privacy-safe trace of what the gateway served, for replaying as a load-test workload.

Off by default; `serving.trace: {path, max_bytes, keep, include_text}` turns it on. One JSON line
per finished request: arrival offset (s since the file's first request), tenant as a salted hash
(a random salt per file, never written anywhere), prompt/output token counts, max_tokens,
budget_ms, degrade level and path, outcome, route and whether it streamed, and which deployment
served it: `arm` (stable, or canary while a canary runs: the share the caller was routed to) and
`deployment` (the key, name@version#sha, of the deployment whose answer was sent; on the canary arm a
failed canary attempt is answered by the stable, and the key says so; null when none answered), so
traffic replayed as the next selection's workload knows its source. No prompt or answer
text unless `include_text`. Each file starts with a header line holding its wall-clock start.

The pure part (the record of a finished request, the line for a file, the rotation decision)
is separate from `TraceWriter`, which keeps the event loop free of file I/O: requests append to
a bounded in-memory buffer (full → dropped and counted), and a background task hands batches to
a thread that writes and rotates (FILE, FILE.1 … FILE.K).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

from ..workload import TRACE_HEADER as HEADER_KEY, TRACE_VERSION as VERSION

log = logging.getLogger("quantgate.serve")

FLUSH_INTERVAL_S = 0.25
BUFFER_LINES = 10_000


# --------------------------------------------------------------------------- pure part
def outcome_of(status: int | None, *, cached: bool = False, degraded: bool = False, error_type: str | None = None,
               limit: str | None = None, closed: bool = False) -> str:
    """A request's outcome label: ok, degraded, cached, client_closed, 429:<limit>, 4xx:<type>, 5xx:<type>."""
    if closed:
        return "client_closed"
    if status is None or status < 400:
        return "cached" if cached else "degraded" if degraded else "ok"
    if status == 429:
        return f"429:{limit or error_type or 'limit'}"
    return f"{status // 100}xx:{error_type or status}"


def event(t_wall: float, tenant: str | None, route: str, stream: bool, outcome: str, *, tokens_in: int,
          tokens_out: int, max_tokens: int | None, budget_ms: int | None, level: str | None = None,
          path: list[str] | None = None, prompt: str | None = None, answer: str | None = None,
          arm: str = "stable", deployment: str | None = None) -> dict:
    """What the request handler hands over (cheap: no hashing, no encoding on the event loop)."""
    return {"t": t_wall, "tenant": tenant, "route": route, "stream": stream, "outcome": outcome,
            "arm": arm, "deployment": deployment,
            "prompt_tokens": tokens_in, "output_tokens": tokens_out, "max_tokens": max_tokens,
            "budget_ms": budget_ms, "degrade": {"level": level, "path": path or []},
            "prompt": prompt, "answer": answer}


def tenant_hash(salt: bytes, tenant: str | None) -> str | None:
    """A keyed hash of the tenant: stable within one file, not reversible without the file's salt."""
    if tenant is None:
        return None
    return hashlib.blake2b(tenant.encode(), key=salt, digest_size=12).hexdigest()


def line(ev: dict, t_first: float, salt: bytes, include_text: bool) -> str:
    """The JSON line for one event in a file whose first request arrived at `t_first` (wall clock)."""
    rec = {"t": round(ev["t"] - t_first, 6), "tenant": tenant_hash(salt, ev["tenant"]),
           **{k: ev[k] for k in ("route", "stream", "outcome", "prompt_tokens", "output_tokens", "max_tokens",
                                 "budget_ms", "degrade", "arm", "deployment")}}
    if include_text:
        rec["prompt"], rec["answer"] = ev["prompt"], ev["answer"]
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def header(t_first: float) -> str:
    start = datetime.fromtimestamp(t_first, timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({HEADER_KEY: VERSION, "started": start}) + "\n"


def needs_rotation(size: int, adding: int, max_bytes: int) -> bool:
    """Whether a file of `size` bytes must be rotated before `adding` more (a non-empty file only)."""
    return size > 0 and size + adding > max_bytes


def rotation_moves(path: Path, keep: int) -> list[tuple[Path, Path | None]]:
    """The renames that rotate FILE: FILE.{keep} is removed (None), FILE.i → FILE.{i+1}, FILE → FILE.1."""
    def p(i: int) -> Path:
        return path if i == 0 else path.with_name(f"{path.name}.{i}")

    moves: list[tuple[Path, Path | None]] = [(p(keep), None)] if keep > 0 else [(p(0), None)]
    moves += [(p(i), p(i + 1)) for i in range(keep - 1, -1, -1)] if keep > 0 else []
    return moves


# ------------------------------------------------------------------------------ the writer
class _File:
    """The thread side: the open trace file, its salt and start, rotation by size."""

    def __init__(self, spec):
        self.path = Path(spec.path).expanduser()
        self.max_bytes, self.keep, self.include_text = spec.max_bytes, spec.keep, spec.include_text
        self.fh = None
        self.salt = b""
        self.t_first = 0.0

    def _open(self, t_first: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # only the gateway's user reads it: who called when, and with include_text what they said
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a file an earlier run (or another umask) left readable
        self.fh = open(fd, "a", encoding="utf-8")
        self.salt, self.t_first = secrets.token_bytes(16), t_first
        self.fh.write(header(t_first))

    def _rotate(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for src, dst in rotation_moves(self.path, self.keep):
            if dst is None:
                src.unlink(missing_ok=True)
            elif src.exists():
                os.replace(src, dst)

    def write(self, events: list[dict]) -> None:
        for ev in events:
            if self.fh is None:
                if self.path.exists() and self.path.stat().st_size > 0:
                    self._rotate()  # a file from an earlier run: one file, one salt
                self._open(ev["t"])
            text = line(ev, self.t_first, self.salt, self.include_text)
            if needs_rotation(self.fh.tell(), len(text.encode()), self.max_bytes):
                self._rotate()
                self._open(ev["t"])
                text = line(ev, self.t_first, self.salt, self.include_text)
            self.fh.write(text)
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class TraceWriter:
    """Bounded buffer on the event loop, writes in a thread. `add()` never blocks or raises."""

    def __init__(self, spec, on_drop=lambda n: None, capacity: int = BUFFER_LINES,
                 interval_s: float = FLUSH_INTERVAL_S):
        self.spec, self.on_drop, self.interval_s = spec, on_drop, interval_s
        self.buf: collections.deque = collections.deque()
        self.capacity = capacity
        self.dropped = 0
        self._file = _File(spec)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def add(self, ev: dict) -> None:
        if len(self.buf) >= self.capacity:
            self.dropped += 1
            self.on_drop(1)
            return
        self.buf.append(ev)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered (in a thread); a failing disk is logged and the batch dropped."""
        async with self._lock:
            if not self.buf:
                return
            batch = list(self.buf)
            self.buf.clear()
            try:
                await asyncio.to_thread(self._file.write, batch)
            except OSError as exc:
                self.dropped += len(batch)
                self.on_drop(len(batch))
                log.error("trace %s: write failed, %d records dropped: %s", self._file.path, len(batch), exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
        await asyncio.to_thread(self._file.close)
