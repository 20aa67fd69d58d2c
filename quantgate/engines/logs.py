"""Pure: what an engine's own log lines say — the kernel it picked, and why a start failed.

Patterns are data (kernel patterns per kind in engine_spec.KINDS), read against the log as written; a line that matches nothing
is never invented into a reason: the card then shows the engine's last lines as they are.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..engine_spec import KINDS

# (failure kind, pattern): the first matching line, searched from the end, names the cause
FAILURE_PATTERNS: list[tuple[str, str]] = [
    ("oom", r"out of memory|OutOfMemoryError|CUDA error: out of memory|Cannot allocate memory|"
            r"failed to allocate|std::bad_alloc|insufficient memory|not enough (?:KV cache )?memory"),
    ("unsupported", r"Unsupported quantization|Unsupported num_bits|not supported|is not supported|"
                    r"no longer supported|cannot implement|Unknown quantization|unsupported|No kernel"),
    ("load", r"failed to load model|error loading model|Failed to load|invalid magic|failed to read magic|"
             r"not a (?:valid )?gguf|"
             r"gguf_init_from_file|does not appear to have a file named|No such file or directory|"
             r"Is a directory"),
    ("config", r"\b\w*(?:Error|Exception): .*|Value error, .*|AssertionError.*|error: .*"),
]

_NOISE = re.compile(r"^\s*(?:\^+|~+|File \".*\", line \d+.*|Traceback \(most recent call last\):)\s*$"
                    r"|\b\w+Warning: |For further information visit")
_MESSAGE_INDENTED = re.compile(r"^\s+Value error, ")  # pydantic puts the cause on an indented line


@dataclass(frozen=True)
class LogReading:
    kernel: str | None  # what the engine said it uses
    failure: str | None  # oom | unsupported | load | config | None
    reason: str | None  # the engine's own line naming the cause

    def to_dict(self) -> dict:
        return asdict(self)


def kernels_in(engine_kind: str, lines: list[str]) -> list[str]:
    """Every distinct kernel name the engine logged, in order of first mention."""
    seen: list[str] = []
    kind = KINDS.get(engine_kind)
    for pat in kind.kernel_patterns if kind else ():
        for line in lines:
            m = re.search(pat, line)
            if m and m.group(1).strip() not in seen:
                seen.append(m.group(1).strip())
        if seen:
            break  # the most specific pattern that matched wins
    return seen


def _clean(line: str) -> str:
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    # drop a logger prefix like "(APIServer pid=1) ERROR 01-02 03:04:05 [file.py:12] "
    line = re.sub(r"^(?:\(\w+ pid=\d+\)\s*)?(?:INFO|WARNING|ERROR|DEBUG|CRITICAL)\s+[\d-]+\s+[\d:.]+\s+\[[^\]]*\]\s*", "", line)
    return line


_CHATTY = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:INFO|WARNING|DEBUG)\s+[\d-]+\s+[\d:.]+\s+\[")
_WRAPPERS = re.compile(r"See root cause above|Engine core initialization failed|Engine process failed to start|"
                       r"APIServer.*exited|Exception in thread")


def failure_in(lines: list[str]) -> tuple[str | None, str | None]:
    """(kind, the engine's line) for the most telling failure line, searched from the end.

    Informational and warning lines are skipped (engines warn about unsupported options they
    then work around), and so are the wrappers that only point back at the root cause."""
    # indented lines are traceback source and context, not messages
    cleaned = [_clean(x) for x in lines if x.strip() and (not x[:1].isspace() or _MESSAGE_INDENTED.match(x))
               and not _NOISE.search(x) and not _CHATTY.match(_clean_ansi(x))]
    cleaned = [x for x in cleaned if not _WRAPPERS.search(x)]
    for kind, pat in FAILURE_PATTERNS:
        rx = re.compile(pat, re.IGNORECASE if kind != "config" else 0)
        hits = [i for i, line in enumerate(cleaned) if rx.search(line)]
        if hits:
            # the first line of the last burst says what went wrong, the last one how it surfaced
            last = hits[-1]
            first = next(i for i in hits if i >= last - 8)
            lines = [cleaned[first]] + ([cleaned[last]] if last != first else [])
            return kind, " … ".join(x[:300] for x in lines)
    return None, None


def _clean_ansi(line: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()


def read_log(engine_kind: str, lines: list[str], *, failed: bool) -> LogReading:
    """The kernel (always looked for) and, for a failed start, the failure the log names."""
    ks = kernels_in(engine_kind, lines)
    kind, reason = failure_in(lines) if failed else (None, None)
    return LogReading(kernel=", ".join(ks) if ks else None, failure=kind, reason=reason)


def oom_in(lines: list[str]) -> bool:
    """Whether the log mentions running out of memory anywhere (a served run can OOM too)."""
    rx = re.compile(FAILURE_PATTERNS[0][1], re.IGNORECASE)
    return any(rx.search(x) for x in lines)
