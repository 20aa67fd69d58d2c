"""`quantgate serve MANIFEST`: the gateway as a command. quantgate/cli.py calls `register(app)`."""

from __future__ import annotations

import logging
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        manifest: Path = typer.Argument(..., help="Serving manifest (JSON or YAML), e.g. examples/manifest.mock.json."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
        port: int = typer.Option(8787, "--port", help="Port to listen on."),
        log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error"),
    ):
        """Serve the manifest's active deployment behind budgets, 429s, cache, degrade ladder and metrics.

        The manifest is re-read when the file changes, so promote and rollback take effect without a restart.
        Engines the manifest names (vllm, llamacpp) are started, supervised and stopped by the gateway;
        a changed manifest switches to new engines blue/green, once they answer.

        Try it: quantgate serve examples/manifest.mock.json, then POST {"user_id": "u1", "prompt": "hello",
        "budget_ms": 1200} to http://127.0.0.1:8787/chat (or use /v1/chat/completions with any OpenAI client).
        """
        from ..errors import QuantgateError
        from .manifest import load_manifest
        from .server import serve as run

        level = getattr(logging, log_level.upper(), None)
        if not isinstance(level, int):
            raise QuantgateError(f"--log-level: '{log_level}' is not one of debug, info, warning, error")
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        m = load_manifest(manifest)  # a bad manifest stops here, before anything listens

        def ready(gw, addr):
            engines = gw.supervisor.status()
            started = (f"  engines starting: {', '.join(e['deployment'] + ' (' + e['engine'] + ')' for e in engines)}"
                       " — /readyz says when they answer" if engines else "")
            typer.echo(f"quantgate gateway on http://{addr[0]}:{addr[1]}  active={m.active.key} "
                       f"provider={m.active.provider.kind}  fallback="
                       f"{m.serving.fallback.key if m.serving.fallback else 'none'}{started}  (Ctrl-C stops)", err=True)

        try:
            run(manifest, host, port, on_ready=ready)
        except OSError as exc:
            raise QuantgateError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
