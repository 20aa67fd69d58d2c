"""What a run says while it works: stages × candidates, their state, elapsed time and an ETA.

Workers (child processes) announce their stages with one marker line on stdout (`emit`); the
parent reads every line of a worker's output, writes it to that candidate's log file, and turns
the marker lines into state changes of a `RunView`. The view draws a live table on a terminal and
one plain line per state change anywhere else (CI logs, `| tee`), never redraws.

ETA: expected seconds per (candidate, stage) from earlier runs of the same recipe on this machine
(`~/.cache/quantgate/timings/RECIPE.json`), refined by the work a running stage reports done
(windows, cases, requests).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MARK = "@@quantgate-event "
STATES = ("queued", "running", "cached", "done", "failed", "skipped")
FINISHED = ("cached", "done", "failed", "skipped")
EVAL_STAGES = ("perplexity", "regression", "lm_eval", "offline", "load_test")
STAGES = ("quantize", *EVAL_STAGES)
LABELS = {"quantize": "quantize", "perplexity": "perplexity", "regression": "regression", "lm_eval": "lm-eval",
          "offline": "offline", "load_test": "load test"}


# ----------------------------------------------------------------------------- child side
def emit(stage: str, state: str, **detail) -> None:
    """Announce a stage's state from a worker process (a marker line the parent parses)."""
    out = sys.__stdout__
    if out is None:
        return
    out.write(MARK + json.dumps({"stage": stage, "state": state, **detail}) + "\n")
    out.flush()


def parse_event(line: str) -> dict | None:
    i = line.find(MARK)
    if i < 0:
        return None
    try:
        ev = json.loads(line[i + len(MARK):])
    except json.JSONDecodeError:
        return None
    return ev if isinstance(ev, dict) and ev.get("stage") in STAGES and ev.get("state") in (*STATES, "progress") else None


# ------------------------------------------------------------------------- library noise
# Known-harmless lines that libraries print on every run. Only what matches here is dropped from
# the console with --verbose; the log file keeps every line, and an error line is never dropped.
NOISE = [re.compile(p) for p in (
    r"^\s*$",
    r"Failed to load .*_C_mxfp8",                       # torchao's optional CUDA extension, on CPU
    r"_pytree.*deprecated|torch\.utils\._pytree",       # torch deprecation warnings from libraries
    r"^\s*warnings\.warn\(|^\s*_torch_pytree\.",
    r"GenerationConfig \{|^\s*\"[a-z_]+\": .*,?$|^\s*\}$",  # full GenerationConfig dumps
    r"^\s*[│┃|].*[│┃|]\s*$|^\s*[┌└├╭╰━─┏┗┡┣╞═+][─━═┬┴┼┳┻╇╪+\-]*",  # ASCII banners and INFO tables
    r"\d+%\|.*\|",                                       # progress bars
    r"^(INFO|DEBUG)\b|\bINFO\s+-?\s", r"^\s*INFO\s",
    r"Setting `pad_token_id`|attention mask and the pad token id were not set|pad_token_id` to `eos_token_id",
    r"tokenizer.*(legacy|padding side)|special tokens have been added",
    r"loss_type=None was set",
)]
ERROR = re.compile(r"error|exception|traceback|fatal|killed|out of memory|segmentation", re.I)


def quiet_libraries() -> None:
    """The parent process imports transformers for tokenizers: keep its known notices off the console.

    Only named, known-harmless sources are lowered to errors; anything else still shows.
    """
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree", "tokenicer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*Enum subclass.*register_constant.*")
    warnings.filterwarnings("ignore", message=r".*_pytree.*deprecated.*")


def is_noise(line: str) -> bool:
    if ERROR.search(line):
        return False
    return any(p.search(line) for p in NOISE)


def tail_of_log(path: Path, n: int = 15) -> list[str]:
    """The last n lines of a worker log that are not known noise: what to show when it failed."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [ln.rstrip() for ln in lines if not is_noise(ln) and MARK not in ln]
    return keep[-n:]


# -------------------------------------------------------------------------------- history
class History:
    """Seconds each (candidate, stage) took in the latest run of this recipe on this machine."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, float] = {}
        if path and path.is_file():
            try:
                self.data = {k: float(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError, TypeError):
                self.data = {}  # an unreadable history only costs the ETA

    @classmethod
    def for_recipe(cls, name: str) -> "History":
        from .util import cache_dir

        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return cls(cache_dir("timings") / f"{safe}.json")

    def expected(self, candidate: str, stage: str) -> float | None:
        return self.data.get(f"{candidate}/{stage}")

    def record(self, candidate: str, stage: str, seconds: float) -> None:
        self.data[f"{candidate}/{stage}"] = round(seconds, 2)
        if self.path:
            from .util import atomic_write_json

            atomic_write_json(self.path, self.data)


# ---------------------------------------------------------------------------------- view
def fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Cell:
    state: str = "queued"
    started: float | None = None
    seconds: float | None = None  # final duration
    done: int | None = None
    total: int | None = None
    detail: str = ""


@dataclass
class RunView:
    """The run's state table. `live`: redraw a rich table (terminal); else one line per state change."""

    candidates: list[str]
    stages: list[str]
    history: History = field(default_factory=lambda: History(None))
    live: bool = False
    write: Callable[[str], None] = print
    console: object = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self.cells = {(c, s): Cell() for c in self.candidates for s in self.stages}
        self.t0 = self.clock()
        self._lock = threading.Lock()
        self._live = None
        self.messages: list[str] = []

    # -- state changes
    def set(self, candidate: str, stage: str, state: str, **detail) -> None:
        if (candidate, stage) not in self.cells:
            return
        with self._lock:
            cell = self.cells[(candidate, stage)]
            now = self.clock()
            if state == "progress":
                cell.done, cell.total = detail.get("done"), detail.get("total")
                self._refresh()
                return
            if state == cell.state:
                return
            if state == "running":
                cell.started = now
            elif state in ("done", "failed") and cell.started is not None:
                cell.seconds = now - cell.started
                if state == "done":
                    self.history.record(candidate, stage, cell.seconds)
            cell.state = state
            cell.detail = str(detail.get("detail", ""))[:200]
            if not self.live:
                self.write(self.line(candidate, stage, cell))
            self._refresh()

    def message(self, text: str) -> None:
        if self.live and self._live is not None:
            self._live.console.print(text, highlight=False)
        else:
            self.write(text)

    def line(self, candidate: str, stage: str, cell: Cell) -> str:
        n_done = sum(1 for c in self.cells.values() if c.state in FINISHED)
        what = cell.state
        if cell.state in ("done", "failed") and cell.seconds is not None:
            what += f" in {fmt_s(cell.seconds)}"
        elif cell.state == "running" and (exp := self.history.expected(candidate, stage)):
            what += f" (last time {fmt_s(exp)})"
        if cell.detail:
            what += f": {cell.detail}"
        eta = self.eta()
        tail = f"  · ETA {fmt_s(eta)}" if eta is not None and n_done < len(self.cells) else ""
        return (f"[{n_done}/{len(self.cells)} {fmt_s(self.clock() - self.t0):>6}] "
                f"{LABELS.get(stage, stage):<10} {candidate:<16} {what}{tail}")

    # -- estimates
    def remaining(self, candidate: str, stage: str) -> float | None:
        cell = self.cells[(candidate, stage)]
        if cell.state in FINISHED:
            return 0.0
        exp = self.history.expected(candidate, stage)
        if cell.state == "running":
            elapsed = self.clock() - (self.clock() if cell.started is None else cell.started)
            if cell.done and cell.total and cell.done <= cell.total:
                return elapsed * (cell.total - cell.done) / cell.done
            return None if exp is None else max(exp - elapsed, 0.0)
        return exp

    def eta(self) -> float | None:
        """Seconds left for the whole run; None until every unfinished cell has an estimate."""
        parts = [self.remaining(c, s) for (c, s) in self.cells]
        return None if any(p is None for p in parts) else sum(parts)

    # -- rendering (terminal)
    def table(self):
        from rich.table import Table

        eta = self.eta()
        title = f"quantgate  elapsed {fmt_s(self.clock() - self.t0)}" + (f"  ·  ETA {fmt_s(eta)}" if eta is not None
                                                                          else "  ·  ETA after the first run")
        t = Table(title=title, title_justify="left")
        t.add_column("candidate")
        for s in self.stages:
            t.add_column(LABELS.get(s, s))
        style = {"queued": "dim", "running": "bold yellow", "cached": "cyan", "done": "green", "failed": "bold red",
                 "skipped": "dim"}
        for c in self.candidates:
            row = []
            for s in self.stages:
                cell = self.cells[(c, s)]
                txt = cell.state
                if cell.state == "running" and cell.started is not None:
                    txt += f" {fmt_s(self.clock() - cell.started)}"
                    if cell.total:
                        txt += f" {cell.done or 0}/{cell.total}"
                elif cell.seconds is not None:
                    txt += f" {fmt_s(cell.seconds)}"
                row.append(f"[{style[cell.state]}]{txt}[/]")
            t.add_row(c, *row)
        return t

    def _refresh(self):
        if self._live is not None:
            self._live.update(self.table())

    def __enter__(self):
        if self.live:
            from rich.live import Live

            self._live = Live(self.table(), console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=self.table)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def finished(self) -> list[tuple[str, str, str]]:
        return [(c, s, cell.state) for (c, s), cell in self.cells.items() if cell.state in FINISHED]
