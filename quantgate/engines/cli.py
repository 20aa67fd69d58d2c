"""`quantgate engines`: measure every candidate × engine pair of a recipe and write the
engine-selection card; `quantgate engines --list`: which engines this machine can run, and why not.

    quantgate engines recipes/smollm2-cpu.yaml [--config FILE] [--engine NAME] [--only CAND] [--force]
    quantgate engines --list [--config FILE]

The engine selection (goal, engines and their interpreters, sweep, extra GGUFs) comes from
--config, else `<recipe>.engines.yaml` beside the recipe, else the recipe's evaluation engines. Wired in by `register(app)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import QuantgateError


def selection_file(recipe_path: Path, given: Path | None) -> Path | None:
    if given is not None:
        return given
    beside = recipe_path.with_name(recipe_path.name.removesuffix(".yaml").removesuffix(".yml") + ".engines.yaml")
    return beside if beside.is_file() else None


def register(app: typer.Typer) -> None:
    @app.command("engines")
    def engines(
        recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML file."),
        list_: bool = typer.Option(False, "--list", help="Say which engines are available here, and why not."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="Engine-selection YAML (default: "
                                              "<recipe>.engines.yaml beside the recipe)."),
        workspace: Path = typer.Option(Path(os.environ.get("QUANTGATE_WORKSPACE", "quantgate-workspace")),
                                       "--workspace", "-w", help="Workspace folder (env QUANTGATE_WORKSPACE)."),
        engine: Optional[List[str]] = typer.Option(None, "--engine", "-e", help="Only these engines (repeat)."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Only these candidates or extras (repeat)."),
        requests: Optional[int] = typer.Option(None, "--requests", min=1, help="Override the workload's requests."),
        no_sweep: bool = typer.Option(False, "--no-sweep", help="Skip the concurrency sweep and the search "
                                      "for the highest SLO rate."),
        force: bool = typer.Option(False, "--force", help="Measure again even where a pair's record is current."),
    ):
        """Launch engines on each candidate, measure the pairs under the workload, write the engine card."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from .spec import load_selection, selection_for

        err, out = Console(stderr=True), Console()
        if list_:
            from .available import available

            sel = load_selection(config) if config else None
            if sel is None and recipe is not None:
                f = selection_file(recipe, None)
                sel = load_selection(f) if f else None
            t = Table(title="engines")
            for col in ("engine", "available", "version", "interpreter", "why not"):
                t.add_column(col, overflow="fold")
            for row in available(sel):
                t.add_row(row.get("name", row["kind"]) + ("" if row.get("name") in (None, row["kind"]) else
                                                           f" ({row['kind']})"),
                          "[green]yes" if row["available"] else "[red]no", row.get("version") or "–",
                          escape(row.get("python") or "–"), escape(row.get("why") or ""))
            out.print(t)
            return
        if recipe is None:
            raise QuantgateError("give a recipe (quantgate engines RECIPE) or --list")
        from ..recipe import load_recipe
        from ..workspace import Workspace
        from .matrix import run_matrix

        r = load_recipe(recipe)
        f = selection_file(recipe, config)
        sel = selection_for(r, f)
        over = {}
        if no_sweep:
            over["sweep"] = None
            over["slo_rate"] = False
        if requests is not None:
            w = sel.workload or r.evaluation.workload
            over["workload"] = w.model_copy(update={"requests": requests}) if w else None
        if over:
            sel = sel.model_copy(update=over)
        err.print(f"engine selection from {f or 'the recipe'}: goal {sel.goal}, engines {', '.join(sel.engines)}")
        ws = Workspace(workspace)
        card = run_matrix(r, ws, sel, engines=engine, candidates=only, force=force,
                          command=f"quantgate engines {recipe}" + (f" --config {f}" if f else ""),
                          log=lambda m: err.print(m, highlight=False, markup=False))
        run = ws.run(r)
        rec = card["recommendation"]
        out.print(f"recommended: [bold]{rec.get('recommended') or 'none'}[/] — {rec.get('why')}", highlight=False)
        if rec.get("runner_up"):
            out.print(f"runner-up: {rec['runner_up']}", highlight=False)
        err.print(f"[green]✓[/] card: {run.engine_card_report} (and {run.engine_card.name})")
        if not any(p.get("measured") for p in card["pairs"]):
            raise QuantgateError("no candidate × engine pair could be measured; the card lists why "
                                 f"({run.engine_card_report}); `quantgate engines --list` shows what is installed")
