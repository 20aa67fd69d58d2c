"""Run the engine matrix for one recipe: every artifact × engine the selection names (each pair
measured by pairs.py), each pair's record written as soon as it is measured (engines/pairs/*.json,
reused when nothing it depends on changed), then the card (engines/card.json and card.md).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import QuantgateError
from ..formats import Artifact
from ..recipe import stable_hash
from ..util import atomic_write_json
from ..workload import WorkloadSpec
from ..workspace import RunFolder, read_json
from .card import build_card, render_markdown
from .host import machine
from .measure import required_attainment
from . import quality as engine_quality
from .pairs import refresh, run_pair
from .spec import EngineSelectionSpec, EngineSpec, gguf_converter


def _load_range(pairs: list[dict]) -> str:
    vals = [float(x) for p in pairs if p.get("load_avg") for x in p["load_avg"].split(" → ")]
    return f"{min(vals):.1f}–{max(vals):.1f} over the pairs' measurements" if vals else "not recorded"


def quality_verdicts(run: RunFolder) -> dict[str, dict]:
    """{candidate: {passed, failed_gates}} from the run's compare.json, if the run was compared."""
    comp = run.comparison(required=False)
    if comp is None:
        return {}
    return {c["name"]: {"passed": c.get("passed"), "failed_gates": [g["metric"] for g in c.get("gates", [])
                                                                    if not g.get("passed")]}
            for c in comp.get("candidates", [])}


def token_counter(recipe, log=print):
    """Count prompt tokens with the recipe model's tokenizer (falls back to ~4 chars/token)."""
    try:
        from transformers import AutoTokenizer

        from ..models import resolve

        tok = AutoTokenizer.from_pretrained(resolve(recipe.model.ref, revision=recipe.model.revision, progress=log))
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    except Exception as exc:  # no tokenizer: the load generator's estimate still works
        log(f"prompt sizes use the ~4 chars/token estimate ({type(exc).__name__}: {exc})")
        return None


def pair_key(name: str, spec: EngineSpec, art: Artifact, workload: WorkloadSpec, selection: EngineSelectionSpec,
             regression=None) -> str:
    """What a pair's measurement depends on: the engine settings, the artifact's identity (name,
    path, format, modification time), the workload and sweep. Not the table or the log reading:
    those are re-applied to a reused record (refresh), so a better rule needs no re-measurement."""
    st = Path(art.path).stat() if Path(art.path).exists() else None
    return stable_hash({"engine": name, "spec": spec.model_dump(mode="json"),
                        "artifact": {"name": art.name, "path": art.path, "format": art.format},
                        "mtime": st.st_mtime if st else None, "workload": workload.model_dump(mode="json"),
                        "sweep": selection.sweep.model_dump(mode="json") if selection.sweep else None,
                        "probe": selection.probe_unsupported, "serve_port": selection.serve_port,
                        # only when searched, so the records of pairs measured before the search stay current
                        **({"slo_rate": rate.model_dump(mode="json")} if (rate := selection.rate_search) else {}),
                        "regression": None if regression is None else
                        [[c.model_dump() for c in regression[0]], regression[1]]})


def run_matrix(recipe, ws, selection: EngineSelectionSpec, *, engines: list[str] | None = None,
               candidates: list[str] | None = None, force: bool = False, command: str = "quantgate engines",
               log=print) -> dict:
    """Measure the matrix and write engines/card.{json,md} in the run folder; returns the card."""
    from ..evaluate.loadgen import PromptSource
    from ..evaluate.prompts import prompt_texts
    from .artifacts import candidate_artifacts, extra_artifacts

    unknown = set(engines or ()) - set(selection.engines)
    if unknown:
        raise QuantgateError(f"no engine(s) {', '.join(sorted(unknown))} in the selection; "
                             f"engines: {', '.join(selection.engines)}")
    run = ws.run(recipe)
    workload = selection.workload or recipe.evaluation.workload or WorkloadSpec()
    arts, missing = candidate_artifacts(recipe, ws, selection.candidates)
    sources = {a.name: a for a in arts}  # what extras convert from, whatever --only says
    extra = selection.extra
    if candidates:  # --only: candidates and extras by name
        known = {c.name for c in recipe.candidates} | {x.name for x in extra}
        if set(candidates) - known:
            raise QuantgateError(f"no candidate(s) or extra(s) {', '.join(sorted(set(candidates) - known))}; "
                                 f"known: {', '.join(sorted(known))}")
        arts = [a for a in arts if a.name in candidates]
        missing = {k: v for k, v in missing.items() if k in candidates}
        extra = [x for x in extra if x.name in candidates]
    extras, extra_missing = extra_artifacts(selection.model_copy(update={"extra": extra}), recipe, ws, sources,
                                            converter=gguf_converter(selection), log=log)
    missing.update(extra_missing)
    for n, why in missing.items():
        log(f"! {n}: {why}")
    texts, _ = prompt_texts(workload, warn=log)
    regression = None
    if recipe.evaluation.regression is not None:  # graded on every pair: what each engine answers
        from ..evaluate.regression import load_cases

        regression = (load_cases(recipe.evaluation.regression.path), recipe.evaluation.regression.max_tokens)
    ctx = {"selection": selection, "workload": workload, "run": run, "cost": recipe.evaluation.cost,
           "regression": regression,
           "prompts": PromptSource(texts, token_counter(recipe, log)), "prompt_texts": texts}
    quality = quality_verdicts(run)
    cells, pairs = [], []
    for name, spec in selection.engines.items():
        if engines and name not in engines:
            continue
        for art in arts + extras:
            key = pair_key(name, spec, art, workload, selection, regression)
            cached = run.engine_pair_file(name, art.name)
            saved = None if force else read_json(cached)
            if saved is not None and saved.get("key") == key:
                log(f"✓ {art.name} on {name}: measured before with these settings")
                cell, pair = refresh(saved["cell"], saved["pair"], spec, art)
            else:
                t0, l0 = time.time(), os.getloadavg()[0]
                cell, pair = run_pair(name, spec, art, ctx, log)
                if pair is not None:
                    pair["wall_s"] = round(time.time() - t0, 1)
                    pair["load_avg"] = f"{l0:.1f} → {os.getloadavg()[0]:.1f}"
                atomic_write_json(cached, {"key": key, "cell": cell, "pair": pair})
            if pair is not None:
                pair["quality"] = quality.get(art.name, {"passed": None})
                pairs.append(pair)
            cells.append(cell)
    baseline = recipe.baseline.name if recipe.baseline else None
    evaluated = ((run.evaluation(baseline) or {}).get("metrics") or {}).get("regression_pass_rate") if baseline else None
    engine_quality.apply(pairs, recipe.card.gates, baseline, evaluated)
    device = "cuda" if any(s.device == "cuda" for s in selection.engines.values()) else "cpu"
    context = {
        "recipe": recipe.name, "recipe_hash": recipe.recipe_hash, "goal": selection.goal,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "workload": workload.model_dump(mode="json"),
        "sweep": selection.sweep.model_dump(mode="json") if selection.sweep else None,
        "slo_rate": rate.model_dump(mode="json") if (rate := selection.rate_search) else None,
        "attainment": required_attainment(workload, selection.sweep),
        "prompts": f"{'file ' + workload.prompts_file if workload.prompts_file else 'corpus ' + workload.corpus} "
                   f"(eval split), counted with the model's tokenizer",
        "constraints": {**machine(device), "load_avg": _load_range(pairs)},
        "rollback_to": recipe.card.rollback_to or (recipe.baseline.name if recipe.baseline else None),
        "missing": missing,
        "engines": {n: s.model_dump(mode="json") for n, s in selection.engines.items()},
    }
    card = build_card(context, cells, pairs)
    plot = slo_rate_plot(run, card, log)
    if plot:
        card["plots"] = [plot]
    run.write_engine_card(card, render_markdown(card))
    return card


def slo_rate_points(card: dict, perplexity: dict[str, float]) -> list[tuple[str, float, float]]:
    """(pair, highest load within the SLOs, the candidate's perplexity) for each pair with both."""
    from .card import pair_id, slo_load

    return [(pair_id(p), slo_load(p), perplexity[p["artifact"]["name"]]) for p in card["pairs"]
            if slo_load(p) is not None and perplexity.get(p["artifact"]["name"]) is not None]


def slo_rate_plot(run: RunFolder, card: dict, log=print) -> str | None:
    """engines/pareto-slo-rate.png: quality × the highest SLO load (the name it has in the card)."""
    names = {p["artifact"]["name"] for p in card["pairs"]}
    ppl = {n: ((run.evaluation(n) or {}).get("metrics") or {}).get("perplexity") for n in names}
    points = slo_rate_points(card, ppl)
    if not points:
        return None
    try:
        from ..plots import slo_rate_plot as draw

        unit = next(((p.get("slo_rate") or {}).get("unit") for p in card["pairs"] if p.get("slo_rate")), "req/s")
        made = draw(points, run.engine_slo_rate_plot, unit=unit, recommended=card["recommendation"].get("recommended"))
    except ImportError as exc:  # matplotlib is optional: the card stands without its plot
        log(f"no Pareto plot of the SLO load ({exc})")
        return None
    return made.name if made else None
