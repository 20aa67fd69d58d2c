"""Fixtures for the engine tests: a fake engine interpreter that starts tests/engines/fake_engine.py
the way quantgate starts vLLM or llama.cpp (`PYTHON -m MODULE --model ... --port ...`)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parent / "fake_engine.py"


@pytest.fixture()
def fake_python(tmp_path) -> Path:
    """An executable that behaves like an engine's interpreter, running the fake engine."""
    p = tmp_path / "fake-venv" / "bin" / "python"
    p.parent.mkdir(parents=True)
    p.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


@pytest.fixture()
def fake_cmd():
    """A Command that runs the fake engine directly with extra flags."""
    from quantgate.procs import Command

    def make(port: int, *flags: str) -> Command:
        return Command([sys.executable, str(FAKE), "-m", "fake", "--port", str(port), "--model", "m", *flags], {})

    return make
