"""Fixtures for the gateway tests: manifests written to disk, a real gateway on loopback, and a
real OpenAI-compatible stub upstream on loopback (its `model` field scripts its faults)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quantgate.serve.server import ServerThread

# The test modules here share helpers in gwkit.py; make it importable whatever the import mode.
sys.path.insert(0, str(Path(__file__).parent))
from gwkit import StubThread, write  # noqa: E402


@pytest.fixture(scope="session")
def upstream():
    s = StubThread().start()
    yield s
    s.stop()


@pytest.fixture()
def manifest_path(tmp_path) -> Path:
    return tmp_path / "manifest.json"


@pytest.fixture()
def serve(manifest_path):
    """serve(manifest_dict) → a started ServerThread; stopped at the end of the test."""
    started = []

    def _serve(manifest: dict) -> ServerThread:
        write(manifest_path, manifest)
        srv = ServerThread(manifest_path).start()
        started.append(srv)
        return srv

    yield _serve
    for s in started:
        s.stop()

