"""The one place that wires the stages together: recipe → model → calibration → candidates.

Each stage writes a plain JSON record into the run folder before the next one starts, so a run
can be resumed, inspected and logged after the fact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import __version__
from .data import build_calibration
from .errors import QuantgateError
from .executors import Executor, LocalExecutor, Task, ray_options, task_resources
from .models import model_identity, resolve
from .progress import EVAL_STAGES, History, RunView
from .quantize.runner import WORKER as QUANTIZE_WORKER
from .quantize.runner import candidate_result, needs_calibration, plan_candidate
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
    problems = check_recipe(recipe, recipe.source)
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
             force: bool = False, log=print, on_result=None, view=None, echo=None,
             executor: Executor | None = None) -> list[CandidateResult]:
    """Make each candidate's checkpoint (resuming). `view`: the run's state table (a plain one by
    default); `echo`: where --verbose shows the workers' own output (else only their log files);
    `executor`: where the candidates' steps run (this machine, one after another, by default)."""
    executor = executor or LocalExecutor()
    chosen = select(recipe, only)
    view = view or run_view(recipe, chosen, log)
    t0 = time.perf_counter()
    source, meta, calib_file = prepare(recipe, ws, view.message)
    run = ws.run(recipe)
    run.add_timing("prepare", "-", time.perf_counter() - t0, "done")
    finished: dict[str, CandidateResult] = {}

    def record(res: CandidateResult, wall_s: float, cpu_s: float | None = None, node: str | None = None):
        view.set(res.name, "quantize", res.status, detail=_failure(res.error, run.log_file(res.name, "quantize")))
        run.add_timing("quantize", res.name, wall_s, res.status, cpu_s=cpu_s, node=node)
        finished[res.name] = res
        # written after every candidate, in the recipe's order: an interrupted run keeps what it finished
        run.write_quantize(recipe, [finished[c.name] for c in chosen if c.name in finished])
        if on_result:
            on_result(res)

    tasks, targets = [], {}
    for spec in chosen:
        t0 = time.perf_counter()
        target, step = plan_candidate(
            spec, source=source, calibration_file=calib_file if needs_calibration(spec) else None,
            artifacts=ws.artifacts, meta=meta, device=device, force=force,
            load={"trust_remote_code": recipe.model.trust_remote_code, "allow_pickle": recipe.model.allow_pickle})
        if isinstance(step, CandidateResult):  # already made for these hashes
            record(step, time.perf_counter() - t0)
            continue
        targets[spec.name] = target
        tasks.append(Task(spec.name, "quantize", QUANTIZE_WORKER, step, ws.artifacts, run.log_file(spec.name, "quantize"),
                          cwd=ws.artifacts, resources=ray_options(task_resources(recipe.executor, spec.name, "quantize"), device),
                          on_start=lambda where, n=spec.name, m=spec.method: view.set(n, "quantize", "running",
                                                                                     detail=_where(m, where))))
    for task, outcome in executor.run(tasks, echo=echo):
        spec = recipe.candidate(task.name)
        record(candidate_result(spec, targets[task.name], outcome.result), outcome.wall_s, outcome.cpu_s, outcome.node)
    return [finished[c.name] for c in chosen]


def _where(detail: str, where: str) -> str:
    return detail if where == "local" else f"{detail} on {where}"


def _failure(error: str | None, log_file: Path) -> str:
    return f"{error.splitlines()[0][:160]} (log: {log_file})" if error else ""


EVALUATE_WORKER = "quantgate.evaluate.worker"


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
    """auto → cuda where torch sees a GPU here, else cpu. An explicit cuda is passed on as asked even
    where this process sees none: under the Ray executor the GPU may be on a worker node."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ------------------------------------------------------------------------------ evaluate
def eval_key(recipe: Recipe, spec, artifact_record: dict) -> str:
    """What an evaluation result depends on: the artifact, the evaluation settings, the engine, and
    the dtype the candidate is scored in (resolved, so a recipe that leaves it to the baseline gets
    a new key when the baseline's dtype changes)."""
    from .recipe import stable_hash

    return stable_hash({
        "artifact": artifact_record.get("candidate_key") or artifact_record.get("checksums"),
        "evaluation": recipe.evaluation.model_dump(mode="json", exclude={"engines"}),
        "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
        "dtype": recipe.evaluation_dtype,
    })


def evaluate(recipe: Recipe, ws: Workspace, *, only: list[str] | None = None, device: str = "cpu",
             force: bool = False, log=print, view=None, echo=None, executor: Executor | None = None) -> list[dict]:
    """Quantize (resuming) and evaluate each candidate in its own process (on `executor`); returns the records."""
    from .evaluate.prompts import corpus_prompts

    executor = executor or LocalExecutor()
    view = view or run_view(recipe, select(recipe, only), log, evaluate=True)
    results = quantize(recipe, ws, only=only, device=device, log=log, view=view, echo=echo, executor=executor)
    run = ws.run(recipe)
    w = recipe.evaluation.workload
    texts = [] if w is None or w.prompts_file else corpus_prompts(w.corpus)  # a prompts file is read by the worker
    stages = eval_stages(recipe)
    records: dict[str, dict] = {}
    tasks, keys = [], {}
    for res in results:
        spec = recipe.candidate(res.name)
        if res.status == "failed":
            for s in stages:
                view.set(res.name, s, "skipped")
            records[res.name] = {"name": res.name, "method": res.method, "error": f"quantization failed: {res.error}"}
            continue
        key = eval_key(recipe, spec, res.record)
        # results are cached by what they depend on, not by recipe: editing the card or the
        # candidate list re-gates without re-measuring
        if not force and (hit := read_json(ws.evaluation_cache(key))) is not None:
            for s in stages:
                view.set(res.name, s, "cached")
            rec = {**hit, "name": res.name}
            run.write_evaluation(res.name, rec)
            records[res.name] = rec
            continue
        job = {
            "candidate": {"name": res.name, "method": res.method, "artifact": res.artifact},
            "evaluation": recipe.evaluation.model_dump(mode="json"),
            "engine": recipe.evaluation.engines[spec.engine].model_dump(mode="json"),
            "device": device, "dtype": recipe.evaluation_dtype, "eval_key": key, "prompt_texts": texts,
        }
        keys[res.name] = key
        tasks.append(Task(res.name, "evaluate", EVALUATE_WORKER, job, run.evaluate_dir, run.log_file(res.name, "evaluate"),
                          resources=ray_options(task_resources(recipe.executor, res.name, "evaluate"), device),
                          on_event=lambda ev, n=res.name: view.set(n, ev.pop("stage"), ev.pop("state"), **ev)))
    for task, outcome in executor.run(tasks, echo=echo):
        got, name = outcome.result, task.name
        run.add_timing("evaluate", name, outcome.wall_s, "failed" if got.get("error") else "done",
                       (got.get("record") or {}).get("timings_s"), cpu_s=outcome.cpu_s, node=outcome.node)
        if got.get("error"):
            for s in stages:  # the stage that broke is failed; the ones it never reached are skipped
                cell = view.cells.get((name, s))
                if cell and cell.state == "running":
                    view.set(name, s, "failed", detail=_failure(got["error"], task.log_file))
                elif cell and cell.state == "queued":
                    view.set(name, s, "skipped")
            records[name] = {"name": name, "method": recipe.candidate(name).method, "error": got["error"]}
        else:
            rec = got["record"]
            atomic_write_json(ws.evaluation_cache(keys[name]), rec)
            run.write_evaluation(name, rec)
            records[name] = rec
    return [records[r.name] for r in results]


def compare_run(recipe: Recipe, ws: Workspace, records: list[dict]):
    """Gate every candidate against the baseline; write compare.json and compare.md."""
    from .evaluate.compare import compare
    from .evaluate.report import comparison_markdown

    baseline = recipe.baseline
    if baseline is None:
        raise QuantgateError(f"recipe '{recipe.name}': comparing needs a baseline candidate (method: baseline)")
    rows = [{"name": r["name"], "method": r.get("method", ""), "metrics": r.get("metrics", {}), "error": r.get("error"),
             "dtype": r.get("dtype"), "kernels": r.get("kernels")} for r in records]
    if not any(r["name"] == baseline.name and not r["error"] for r in rows):
        raise QuantgateError(f"the baseline '{baseline.name}' has no evaluation; rerun `quantgate evaluate`")
    comp = compare(rows, baseline.name, recipe.card.gates, cost_tolerance=recipe.card.cost_tolerance_or_default)
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

