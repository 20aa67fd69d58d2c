"""Checks a recipe before any work starts: against its model (reads config.json, never weights),
and against what the run would fail on later — unknown corpora, missing files, gates on metrics
that nothing measures."""

from __future__ import annotations

from pathlib import Path

from .documents import line_of, suggest
from .models import layer_widths, read_config, valid_group_sizes
from .recipe import Recipe


def group_size_problems(recipe: Recipe, config: dict) -> list[str]:
    """One message per candidate whose group size does not divide every quantized layer's width."""
    widths = layer_widths(config)
    good = valid_group_sizes(widths)
    problems = []
    for c in recipe.candidates:
        g = getattr(c, "group_size", None)
        if g is None or g == -1:
            continue
        bad = {k: w for k, w in widths.items() if w % g}
        if bad:
            shown = ", ".join(f"{k} has {w} inputs" for k, w in bad.items())
            problems.append(
                f"candidates.{c.name}.group_size: {g} does not divide the model's layer widths ({shown}); "
                f"sizes that work: {', '.join(map(str, good)) or 'none'}, or -1 (per-channel)"
            )
    return problems


def check_recipe(recipe: Recipe, source: str | Path | None = None, root=None) -> list[str]:
    """Everything that can be checked without loading weights; empty means the recipe is runnable.

    With the recipe's file and YAML node tree (`documents.read_mapping`), messages start with
    `file:line:` like the schema's own errors."""
    early = _placed(data_problems(recipe) + calibration_problems(recipe) + gate_problems(recipe), source, root)
    config = read_config(recipe.model.ref, revision=recipe.model.revision)
    return early + group_size_problems(recipe, config) + _placed(mixed_problems(recipe, config), source, root)


def mixed_problems(recipe: Recipe, config: dict) -> list[tuple[tuple, str]]:
    """Mixed candidates whose budget no allocation can meet, or that leaves nothing to allocate, with
    the range that would work (sized from config.json: the same size model the quantizer uses)."""
    from . import allocation as allocate

    out = []
    for i, c in enumerate(recipe.candidates):
        if c.method != "mixed":
            continue
        if c.sensitivity_samples > recipe.calibration.n_samples:
            out.append((("candidates", i, "sensitivity_samples"),
                        f"candidates.{i}.sensitivity_samples: {c.sensitivity_samples} is more than the "
                        f"{recipe.calibration.n_samples} windows of calibration.n_samples"))
        try:
            linears, fixed = allocate.llama_linears(config), allocate.llama_fixed_bytes(config)
        except KeyError as exc:  # not a llama-like config: the quantizer sizes it from the weights
            del exc
            continue
        plan = allocate.make_plan(linears, c.choices, c.group_size, allocate.skip_matcher(c.skip), fixed)
        if problem := allocate.budget_problem(plan, c.budget.kind, c.budget.value):
            out.append((("candidates", i, "budget", c.budget.kind),
                        f"candidates.{i}.budget.{c.budget.kind} ({c.name}): {problem}"))
    return out


# ------------------------------------------------------------------ refused before the run, not during it
# The metric names the evaluation stage produces (evaluate/worker.py), by what the recipe turns on.
ALWAYS_MEASURED = frozenset({"weights_mb", "peak_rss_mb", "peak_cuda_mb"})
LOAD_METRICS = frozenset({f"{m}_{q}_ms" for m in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p95", "p99")}
                         | {"load_requests_n", "throughput_rps", "output_tok_s", "goodput_rps", "slo_attainment",
                            "error_rate", "timeout_rate", "usd_per_1m_output_tokens", "usd_per_request"})


def measured_metrics(ev) -> frozenset[str]:
    out = set(ALWAYS_MEASURED)
    if ev.perplexity:
        out.add("perplexity")
    if ev.regression:
        out.add("regression_pass_rate")
    if ev.offline:
        out |= {"prefill_ms", "decode_ms_per_token"}
    if ev.workload:
        out |= LOAD_METRICS
    return frozenset(out)


def gate_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Gates on a metric that nothing in this recipe measures (a typo would silently gate nothing)."""
    measured = measured_metrics(recipe.evaluation)
    tasks = set(recipe.evaluation.lm_eval.tasks) if recipe.evaluation.lm_eval else set()
    out = []
    for i, g in enumerate(recipe.card.gates):
        parts = g.metric.split("/")
        if g.metric in measured or (len(parts) == 3 and parts[0] == "lm_eval" and parts[1] in tasks):
            continue
        names = sorted(measured | {f"lm_eval/{t}/acc" for t in tasks})
        out.append((("card", "gates", i, "metric"),
                    f"card.gates.{i}.metric: '{g.metric}' is not measured by this recipe's evaluation"
                    + suggest(g.metric, names) + f" (measured: {', '.join(names)})"))
    return out


def data_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Corpora, calibration files and the regression set that the run would fail to find."""
    from .data import CORPORA

    out = []
    for i, src in enumerate(recipe.calibration.sources):
        if src.corpus and src.corpus not in CORPORA:
            out.append((("calibration", "sources", i, "corpus"),
                        f"calibration.sources.{i}.corpus: unknown bundled corpus '{src.corpus}'"
                        + suggest(src.corpus, CORPORA) + f"; bundled: {', '.join(CORPORA)}"))
        if src.path and not Path(src.path).expanduser().exists():
            out.append((("calibration", "sources", i, "path"),
                        f"calibration.sources.{i}.path: '{src.path}' does not exist (relative paths are "
                        "read from the folder you run quantgate in)"))
    reg = recipe.evaluation.regression
    if reg and not Path(reg.path).expanduser().is_file():
        out.append((("evaluation", "regression", "path"),
                    f"evaluation.regression.path: '{reg.path}' does not exist"))
    w = recipe.evaluation.workload
    if w is not None:
        corpus = getattr(w, "corpus", None)
        if corpus and corpus not in CORPORA:
            out.append((("evaluation", "workload", "corpus"),
                        f"evaluation.workload.corpus: unknown bundled corpus '{corpus}'" + suggest(corpus, CORPORA)))
        pf = getattr(w, "prompts_file", None)
        if pf and not Path(pf).expanduser().is_file():
            out.append((("evaluation", "workload", "prompts_file"),
                        f"evaluation.workload.prompts_file: '{pf}' does not exist"))
    return out


def calibration_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Calibration the run could not build: a candidate asking for more windows than the set has,
    or a source whose calib split cannot hold its share of windows. The second needs no tokenizer:
    a token never covers less than one byte (byte-level BPE, or byte fallback), and each document
    adds one separator, so text with fewer bytes than its share's tokens would surely fail."""
    from .data import allocate, split_documents
    from .errors import QuantgateError

    cal = recipe.calibration
    out = []
    for i, c in enumerate(recipe.candidates):
        n = getattr(c, "n_samples", None)
        if n is not None and n > cal.n_samples:
            out.append((("candidates", i, "n_samples"),
                        f"candidates.{i}.n_samples: {n} is more than the {cal.n_samples} windows of "
                        f"calibration.n_samples; use at most {cal.n_samples} or raise calibration.n_samples"))
    shares = allocate(cal.n_samples, [s.weight for s in cal.sources])
    for i, (src, n) in enumerate(zip(cal.sources, shares)):
        if n == 0 or src.hf:  # a hub dataset is only read when the run starts
            continue
        try:
            docs = split_documents(src, "calib")
        except (QuantgateError, OSError):  # not fetched or not there: data_problems / the run say so
            continue
        most = sum(len(d.text.encode()) + 1 for d in docs)
        if most // cal.seq_len < n:
            out.append((("calibration", "sources", i),
                        f"calibration.sources.{i}: the calib split of {src.label} has {most} bytes, room for "
                        f"at most {most // cal.seq_len} windows of {cal.seq_len} tokens, but its share of "
                        f"calibration.n_samples is {n}; lower n_samples or seq_len, or add text"))
    return out


def _placed(problems: list[tuple[tuple, str]], source, root) -> list[str]:
    """'file:line: message' where the line is known (the recipe's YAML node tree)."""
    out = []
    for loc, msg in problems:
        line = line_of(root, loc) if root is not None else None
        out.append(f"{source}:{line}: {msg}" if source and line else (f"{source}: {msg}" if source else msg))
    return out
