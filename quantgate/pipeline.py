"""The one place that wires the stages together: recipe → model → calibration → candidates.

Each stage writes a plain JSON record into the run folder before the next one starts, so a run
can be resumed, inspected and logged after the fact.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from . import __version__
from .data import build_calibration
from .errors import QuantgateError
from .models import model_identity, resolve
from .progress import EVAL_STAGES, History, RunView
from .quantize.runner import needs_calibration, run_candidate
from .recipe import Recipe
from .util import atomic_write_json
from .validate import check_recipe
from .workspace import CandidateResult, Workspace, read_json


def select(recipe: Recipe, only: list[str] | None):
    if not only:
        return list(recipe.candidates)
    return [recipe.candidate(n) for n in only]  # raises with a suggestion for a typo


def prepare(recipe: Recipe, ws: Workspace, log=print) -> tuple[Path, dict, Path | None]:
    """Validate, resolve the model, build the calibration set; returns (model folder, meta, calib file)."""
    problems = check_recipe(recipe)
    if problems:
        raise QuantgateError("the recipe cannot run on this model:\n" + "\n".join(problems))
    run = ws.run(recipe)
    run.write_recipe(recipe)
    source = resolve(recipe.model.ref, revision=recipe.model.revision, progress=log)
    meta = {
        "recipe": recipe.name,
        "recipe_hash": recipe.recipe_hash,
        "model": {"ref": recipe.model.ref, "folder": str(source), "identity": model_identity(source)},
        "quantgate_version": __version__,
    }
    calib_file = None
    if any(needs_calibration(c) for c in recipe.candidates):
        calib_file = run.calibration_file
        if calib_file.is_file():
            calib = json.loads(calib_file.read_text())
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
            cs = build_calibration(recipe.calibration, tok)
            calib = {**cs.describe(), "spec": recipe.calibration.model_dump(mode="json"), "windows": cs.windows}
            atomic_write_json(calib_file, calib)
            log(f"calibration: {cs.describe()['n_samples']} windows × {cs.seq_len} tokens "
                f"from {cs.per_source} (calib_hash {cs.calib_hash[:12]})")
        meta["calib_hash"] = calib["calib_hash"]
        meta["calibration"] = {k: v for k, v in calib.items() if k != "windows"}
    return source, meta, calib_file


def quantize(recipe: Recipe, ws: Workspace, *, only: list[str] | None = None, device: str = "cpu",
             force: bool = False, log=print, on_result=None, view=None, echo=None) -> list[CandidateResult]:
    """Make each candidate's checkpoint (resuming). `view`: the run's state table (a plain one by
    default); `echo`: where --verbose shows the workers' own output (else only their log files)."""
    chosen = select(recipe, only)
    view = view or run_view(recipe, chosen, log)
    t0 = time.perf_counter()
    source, meta, calib_file = prepare(recipe, ws, view.message)
    run = ws.run(recipe)
    run.add_timing("prepare", "-", time.perf_counter() - t0, "done")
    results: list[CandidateResult] = []
    for spec in chosen:
        t0, c0 = time.perf_counter(), _children_cpu()
        res = run_candidate(
            spec, source=source, calibration_file=calib_file if needs_calibration(spec) else None,
            artifacts=ws.artifacts, meta=meta, device=device, force=force, log=lambda *_: None,
            load={"trust_remote_code": recipe.model.trust_remote_code, "allow_pickle": recipe.model.allow_pickle},
            log_file=run.log_file(spec.name, "quantize"), echo=echo,
            on_start=lambda n=spec.name, m=spec.method: view.set(n, "quantize", "running", detail=m),
        )
        view.set(spec.name, "quantize", res.status, detail=_failure(res.error, run.log_file(spec.name, "quantize")))
        run.add_timing("quantize", spec.name, time.perf_counter() - t0, res.status, cpu_s=_children_cpu() - c0)
        results.append(res)
        # written after every candidate: an interrupted run keeps what it finished
        run.write_quantize(recipe, results)
        if on_result:
            on_result(res)
    return results


def _children_cpu() -> float:
    """CPU seconds used by finished worker processes: on a shared machine, what wall time hides."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _failure(error: str | None, log_file: Path) -> str:
    return f"{error.splitlines()[0][:160]} (log: {log_file})" if error else ""


def eval_stages(recipe: Recipe) -> list[str]:
    """The evaluation stages this recipe asks for, in the order the worker runs them."""
    e = recipe.evaluation
    asked = {"perplexity": e.perplexity, "regression": e.regression, "lm_eval": e.lm_eval and e.lm_eval.tasks,
             "offline": e.offline, "load_test": e.workload}
    return [s for s in EVAL_STAGES if asked[s]]


def run_view(recipe: Recipe, chosen, log=print, *, evaluate: bool = False, live: bool = False, console=None):
    """The state table of a run: stages × the chosen candidates, ETA from this recipe's history."""
    stages = ["quantize", *(eval_stages(recipe) if evaluate else [])]
    return RunView([c.name for c in chosen], stages, History.for_recipe(recipe.name), live=live, write=log,
                   console=console)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ------------------------------------------------------------------------------ evaluate
def eval_key(recipe: Recipe, spec, artifact_record: dict) -> str:
    """What an evaluation result depends on: the artifact, the evaluation settings, the engine."""
    from .recipe import stable_hash

    return stable_hash({
        "artifact": artifact_record.get("candidate_key") or artifact_record.get("checksums"),
        "evaluation": recipe.evaluation.model_dump(mode="json", exclude={"engines"}),
        "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
    })


def evaluate(recipe: Recipe, ws: Workspace, *, only: list[str] | None = None, device: str = "cpu",
             force: bool = False, log=print, view=None, echo=None) -> list[dict]:
    """Quantize (resuming) and evaluate each candidate in its own process; returns the records."""
    from .evaluate.prompts import corpus_prompts
    from .isolate import run_in_child

    view = view or run_view(recipe, select(recipe, only), log, evaluate=True)
    results = quantize(recipe, ws, only=only, device=device, log=log, view=view, echo=echo)
    run = ws.run(recipe)
    w = recipe.evaluation.workload
    texts = [] if w is None or w.prompts_file else corpus_prompts(w.corpus)  # a prompts file is read by the worker
    stages = eval_stages(recipe)
    records = []
    for res in results:
        spec = recipe.candidate(res.name)
        if res.status == "failed":
            for s in stages:
                view.set(res.name, s, "skipped")
            records.append({"name": res.name, "method": res.method, "error": f"quantization failed: {res.error}"})
            continue
        key = eval_key(recipe, spec, res.record)
        # results are cached by what they depend on, not by recipe: editing the card or the
        # candidate list re-gates without re-measuring
        cached = ws.evaluation_cache(key)
        if not force and (hit := read_json(cached)) is not None:
            for s in stages:
                view.set(res.name, s, "cached")
            rec = {**hit, "name": res.name}
            run.write_evaluation(res.name, rec)
            records.append(rec)
            continue
        job = {
            "candidate": {"name": res.name, "method": res.method, "artifact": res.artifact},
            "evaluation": recipe.evaluation.model_dump(mode="json"),
            "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
            "device": device, "eval_key": key, "prompt_texts": texts,
        }
        t0, c0 = time.perf_counter(), _children_cpu()
        log_file = run.log_file(res.name, "evaluate")
        got = run_in_child("quantgate.evaluate.worker", job, run.evaluate_dir, log_file=log_file,
                           on_event=lambda ev, n=res.name: view.set(n, ev.pop("stage"), ev.pop("state"), **ev), echo=echo)
        run.add_timing("evaluate", res.name, time.perf_counter() - t0, "failed" if got.get("error") else "done",
                       (got.get("record") or {}).get("timings_s"), cpu_s=_children_cpu() - c0)
        if got.get("error"):
            for s in stages:  # the stage that broke is failed; the ones it never reached are skipped
                cell = view.cells.get((res.name, s))
                if cell and cell.state == "running":
                    view.set(res.name, s, "failed", detail=_failure(got["error"], log_file))
                elif cell and cell.state == "queued":
                    view.set(res.name, s, "skipped")
            rec = {"name": res.name, "method": res.method, "error": got["error"]}
        else:
            rec = got["record"]
            atomic_write_json(cached, rec)
            run.write_evaluation(res.name, rec)
        records.append(rec)
    return records


def compare_run(recipe: Recipe, ws: Workspace, records: list[dict]):
    """Gate every candidate against the baseline; write compare.json and compare.md."""
    from .evaluate.compare import compare
    from .evaluate.report import comparison_markdown

    baseline = recipe.baseline
    if baseline is None:
        raise QuantgateError(f"recipe '{recipe.name}': comparing needs a baseline candidate (method: baseline)")
    rows = [{"name": r["name"], "method": r.get("method", ""), "metrics": r.get("metrics", {}), "error": r.get("error")}
            for r in records]
    if not any(r["name"] == baseline.name and not r["error"] for r in rows):
        raise QuantgateError(f"the baseline '{baseline.name}' has no evaluation; rerun `quantgate evaluate`")
    comp = compare(rows, baseline.name, recipe.card.gates)
    ws.run(recipe).write_comparison(recipe, comp.to_dict(), comparison_markdown(recipe, comp, records))
    return comp


def load_records(recipe: Recipe, ws: Workspace) -> list[dict]:
    run = ws.run(recipe)
    return [run.evaluation(c.name) or {"name": c.name, "method": c.method, "error": "not evaluated"}
            for c in recipe.candidates]


# --------------------------------------------------------------------------------- track
def track(recipe: Recipe, ws: Workspace, *, uri: str | None = None, log=print):
    """Log the finished run (quantize.json, evaluate/*.json, compare.json) to MLflow."""
    from .track import log_run

    run = ws.run(recipe)
    quantize_results = [r.to_dict() for r in run.quantize_results()]
    comparison = run.comparison()
    return log_run(recipe, ws.root, run.path, quantize_results=quantize_results, records=load_records(recipe, ws),
                   comparison=comparison, uri=uri, log=log)

