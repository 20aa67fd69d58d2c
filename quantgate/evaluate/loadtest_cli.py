"""`quantgate loadtest`: drive an OpenAI-compatible server with a workload and report latency.

    quantgate loadtest --url http://127.0.0.1:8000 [--model NAME] [--workload W.yaml]
                       [--requests N] [--concurrency C] [--json report.json]
                       [--trace gateway-trace.jsonl [--time-scale X]]

Wired into the main command group by `register(app)`. Heavy pieces (aiohttp, the corpus
reader) load inside the command. Prompt text comes from `workload.prompts_file` if set, else
from the eval split of the workload's bundled corpus; when that corpus has not been fetched,
a short built-in English text is used instead and a warning says how to get the corpus.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..errors import QuantgateError

# ------------------------------------------------------------------------- workload
def load_workload(path: Path):
    """A WorkloadSpec from YAML or JSON (a bare mapping, or one under a `workload:` key)."""
    from ..documents import load_document
    from ..workload import WorkloadSpec

    return load_document(path, WorkloadSpec, name="workload", unwrap="workload")


def apply_overrides(spec, **options):
    """The workload with command-line options (name → value; None = not given) laid over it."""
    from ..documents import validate
    from ..workload import WorkloadSpec

    over = {k: v for k, v in options.items() if v is not None}
    if "duration_s" in over and "requests" not in over:
        over["requests"] = None  # --duration alone means: send for that long
    if not over:
        return spec
    return validate(WorkloadSpec, {**spec.model_dump(), **over}, "the workload with the command-line options")


def load_prompts(spec, workload_file: Path | None, warn=print):
    """The PromptSource the workload asks for (quantgate.evaluate.prompts says where text comes from)."""
    from .loadgen import PromptSource
    from .prompts import prompt_texts

    texts, origin = prompt_texts(spec, base=Path(workload_file).parent if workload_file else None, warn=warn)
    return PromptSource(texts, origin=origin)


# ---------------------------------------------------------------------------- output
DEFAULT_ATTAINMENT = 0.95  # the share `quantgate engines` requires when the SLOs do not say (sweep.min_attainment)


def within_slo(attainment: float | None, error_rate: float, timeout_rate: float, need: float) -> bool:
    """The rule `quantgate engines` judges a load by (sweep.point_of): enough requests met every
    SLO, and none failed or timed out."""
    return attainment is not None and attainment >= need and not error_rate and not timeout_rate


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def report_tables(report) -> list:
    """Rich tables for a LoadReport: latency percentiles, throughput and rates, per kind."""
    from rich.table import Table

    a = report.aggregates
    lat = Table(title=f"latency (ms) · {report.model or '?'} @ {report.target or report.engine}")
    for col in ("metric", "n", "requests", "mean", "P50", "P95", "P99", "max"):
        lat.add_column(col, justify="right" if col != "metric" else "left")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = getattr(a, name)
        lat.add_row(name.upper(), str(s.n), str(s.requests), *(_ms(x) for x in (s.mean, s.p50, s.p95, s.p99, s.max)))

    slo = report.workload.slo
    slo_text = ", ".join(f"{k} ≤ {v:g}" for k, v in slo.targets.items()) or "none set"
    need = DEFAULT_ATTAINMENT if slo.attainment is None else slo.attainment
    tp = Table(title="throughput")
    tp.add_column("measure")
    tp.add_column("value", justify="right")
    rows = [
        ("requests (ok / error / timeout)", f"{a.total} ({a.ok} / {a.errors} / {a.timeouts})"),
        ("wall time", f"{a.wall_s:.2f} s"),
        ("request throughput", f"{a.request_throughput:.2f} req/s"),
        ("output token throughput", f"{a.output_token_throughput:.1f} tok/s"),
        (f"goodput (SLO: {slo_text})", f"{a.goodput:.2f} req/s"),
        ("SLO attainment", f"{a.slo_attainment:.1%}"),
        ("error rate", f"{a.error_rate:.1%}"),
        ("timeout rate", f"{a.timeout_rate:.1%}"),
        (f"within the SLOs (≥ {need:.0%} attainment, no errors or timeouts)",
         "yes" if within_slo(a.slo_attainment, a.error_rate, a.timeout_rate, need) else "no"),
    ]
    for r in rows:
        tp.add_row(*r)

    kinds = Table(title="per kind (ms: P50 / P99)")
    for col in ("kind", "n", "ok", "TTFT", "TPOT", "E2E", "tok/s", "SLO met"):
        kinds.add_column(col, justify="right" if col != "kind" else "left", no_wrap=True)
    for k, g in a.per_kind.items():
        kinds.add_row(k, str(g.total), str(g.ok), *(f"{_ms(s.p50)} / {_ms(s.p99)}" for s in (g.ttft, g.tpot, g.e2e)),
                      f"{g.output_token_throughput:.1f}", f"{g.slo_attainment:.0%}")
    return [lat, tp, kinds]


def error_summary(records, limit: int = 5) -> list[tuple[int, str]]:
    """The most frequent failure messages, most frequent first."""
    from collections import Counter

    c = Counter(r.error or r.outcome for r in records if r.outcome != "ok")
    return [(n, msg) for msg, n in c.most_common(limit)]


# --------------------------------------------------------------------------- command
def register(app: typer.Typer) -> None:
    @app.command("loadtest")
    def loadtest(
        url: str = typer.Option(..., "--url", help="Server base URL, e.g. http://127.0.0.1:8000 (OpenAI-compatible)."),
        model: Optional[str] = typer.Option(None, "--model", help="Model to request (default: the server's first)."),
        workload: Optional[Path] = typer.Option(None, "--workload", help="Workload spec (.yaml or .json)."),
        requests: Optional[int] = typer.Option(None, "--requests", min=1, help="Measured requests."),
        concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="In-flight cap."),
        duration: Optional[float] = typer.Option(None, "--duration", help="Send for this many seconds instead."),
        arrival: Optional[str] = typer.Option(None, "--arrival", help="concurrency | poisson | burst"),
        rate: Optional[float] = typer.Option(None, "--rate", help="Requests/s for poisson and burst arrivals."),
        api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer token, if the server wants one."),
        env_key: bool = typer.Option(False, "--api-key-from-env",
                                     help="Send $OPENAI_API_KEY as the bearer token (never sent unless asked: "
                                          "--url may point anywhere)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (every request) here."),
        trace: Optional[Path] = typer.Option(None, "--trace", help="Replay a gateway trace (serving.trace) instead "
                                             "of the workload's synthetic mix: FILE and the files it was rotated "
                                             "into (FILE.1 …), oldest first."),
        time_scale: Optional[float] = typer.Option(None, "--time-scale", min=0,
                                                   help="Multiply the trace's arrival times (0.5: twice as fast)."),
    ):
        """Load-test an OpenAI-compatible server: TTFT, TPOT, ITL, E2E percentiles, throughput, goodput."""
        import asyncio

        from rich.console import Console

        from ..util import atomic_write_json
        from ..workload import WorkloadSpec

        err, out = Console(stderr=True), Console()
        spec = load_workload(workload) if workload else WorkloadSpec()
        if spec.trace and workload and not Path(spec.trace).expanduser().is_absolute():
            spec = spec.model_copy(update={"trace": str(Path(workload).parent / spec.trace)})
        spec = apply_overrides(spec, requests=requests, concurrency=concurrency, duration_s=duration,
                               arrival=arrival, rate=rate, trace=str(trace) if trace else None,
                               time_scale=time_scale)
        prompts = load_prompts(spec, workload, warn=lambda m: err.print(f"[yellow]warning:[/] {m}", highlight=False))
        if spec.trace:
            from ..workload import trace_files

            files = trace_files(spec.trace)
            err.print(f"replaying the trace in {', '.join(str(f) for f in files)}", highlight=False, soft_wrap=True)
        if env_key and not api_key:
            api_key = os.environ.get("OPENAI_API_KEY")
            if not api_key:
                raise QuantgateError("--api-key-from-env: OPENAI_API_KEY is not set")
        report = asyncio.run(_run(url, model, api_key, spec, prompts, err))
        for t in report_tables(report):
            out.print(t)
        for n, msg in error_summary(report.records):
            err.print(f"[red]{n}×[/] {msg}", highlight=False)
        if json_out is not None:
            atomic_write_json(json_out, report.to_dict())
            err.print(f"[green]✓[/] report written to {json_out}")
        if report.aggregates.ok == 0:
            first = next((r.error for r in report.records if r.error), "no detail")
            raise QuantgateError(f"no request to {url} succeeded; first failure: {first}")


async def _run(url, model, api_key, spec, prompts, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .clients.openai_http import OpenAIClient
    from .loadgen import run_load

    engine = OpenAIClient(url, model, api_key=api_key, timeout=max(spec.timeout_s, 1.0))
    await engine.start()
    try:
        if engine.model is None:
            try:
                models = await engine.list_models()
            except QuantgateError as exc:
                raise QuantgateError(f"could not ask {url} which model it serves ({exc}); pass --model") from None
            if not models:
                raise QuantgateError(f"{url}/v1/models lists no model; pass --model")
            engine.model = models[0]
            console.print(f"model: {engine.model} (from {url}/v1/models)")
        with Progress(TextColumn("loadtest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("requests", total=spec.requests)
            return await run_load(engine, spec, prompts, progress=lambda done, total: bar.update(task, completed=done))
    finally:
        await engine.close()
