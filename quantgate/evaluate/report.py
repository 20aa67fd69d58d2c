"""Render a comparison for people: a terminal table and Markdown (JSON is the Comparison itself)."""

from __future__ import annotations

from .compare import Comparison

# (metric, header, format) — the columns a reviewer reads first, in order
COLUMNS = [
    ("perplexity", "ppl", "{:.2f}"),
    ("regression_pass_rate", "regr. pass", "{:.0%}"),
    ("ttft_p50_ms", "TTFT P50 ms", "{:.0f}"),
    ("ttft_p95_ms", "TTFT P95 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT P50 ms", "{:.1f}"),
    ("e2e_p95_ms", "E2E P95 ms", "{:.0f}"),
    ("output_tok_s", "out tok/s", "{:.1f}"),
    ("weights_mb", "weights MB", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("usd_per_1m_output_tokens", "$/1M out tok", "{:.3f}"),
    ("error_rate", "errors", "{:.0%}"),
]


def columns(comp: Comparison) -> list[tuple[str, str, str]]:
    """COLUMNS, then one accuracy column per lm-eval task that was measured (with its n)."""
    cols = list(COLUMNS)
    seen = {}
    for v in comp.candidates:
        for k, val in v.metrics.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "lm_eval" and parts[2] in ("acc", "exact_match", "acc_norm"):
                task = parts[1]
                if task not in seen or parts[2] == "acc":
                    n = v.metrics.get(f"lm_eval/{task}/n")
                    seen[task] = (k, f"{task} {parts[2]}" + (f" (n={n:.0f})" if n else ""), "{:.2f}")
    return cols + list(seen.values())


def scored_in(comp: Comparison) -> str:
    """'; every candidate scored in bfloat16', or the mix when records from older runs differ."""
    got = {v.dtype for v in comp.candidates if v.dtype}
    if not got:
        return ""
    if len(got) == 1:
        return f"; every candidate scored in {got.pop()}"
    return "; NOT on equal terms, scored in " + ", ".join(f"{v.name} {v.dtype}" for v in comp.candidates if v.dtype)


def kernel_label(kernels: dict | None) -> str | None:
    """'TorchQuantLinear' (or 'A + B' for a mix), 'dense' for {}, None where the record has none."""
    if kernels is None:
        return None
    return " + ".join(sorted(kernels)) or "dense"


def arithmetic(comp: Comparison) -> str:
    """'; quantized candidates on different arithmetic: …' when their records name different kernels
    (one dequantizing into float32 beside an int4 kernel in bfloat16, say), else ''. The baseline is
    dense by definition and is left out; a dtype mix is scored_in's to report."""
    got = {v.name: kernel_label(v.kernels) for v in comp.candidates if v.name != comp.baseline and not v.error}
    named = {n: k for n, k in got.items() if k is not None}
    if len(set(named.values())) <= 1:
        return ""
    return "; quantized candidates on different arithmetic: " + ", ".join(f"{n} {k}" for n, k in named.items())


def latency_n(comp: Comparison) -> str:
    ns = {int(v.metrics["load_requests_n"]) for v in comp.candidates if v.metrics.get("load_requests_n")}
    return f"; latency percentiles over n={'/'.join(map(str, sorted(ns)))} requests each" if ns else ""


def _fmt(v, fmt):
    if v is None:
        return "–"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _cell(metric, fmt, verdict, show_recovery=("perplexity", "regression_pass_rate")):
    v = verdict.metrics.get(metric)
    s = _fmt(v, fmt)
    r = verdict.recovery.get(metric)
    if metric in show_recovery and r is not None and verdict.name != "":
        s += f" ({r:.0%})"
    se = verdict.metrics.get(f"{metric}_stderr")
    if v is not None and se is not None:
        s += f" ±{se:.2f}"
    return s


def _status(verdict, comp: Comparison) -> str:
    if verdict.error:
        return "error"
    if verdict.name == comp.baseline:
        return "baseline"
    failed = [g for g in verdict.gates if not g.passed]
    return "pass" if not failed else f"FAIL ({len(failed)})"


def comparison_table(comp: Comparison):
    from rich.table import Table

    cols = columns(comp)
    t = Table(title=f"candidates vs baseline '{comp.baseline}'  (recovery in brackets{latency_n(comp)}{scored_in(comp)}{arithmetic(comp)})")
    t.add_column("candidate")
    t.add_column("gates")
    for _, head, _ in cols:
        t.add_column(head, justify="right")
    for v in comp.candidates:
        star = " ★" if v.name == comp.recommended else ""
        status = _status(v, comp)
        color = {"pass": "green", "baseline": "cyan", "error": "red"}.get(status, "red")
        t.add_row(v.name + star, f"[{color}]{status}", *[_cell(m, f, v) for m, _, f in cols])
    return t


def failed_gate_lines(comp: Comparison) -> list[str]:
    lines = []
    for v in comp.candidates:
        if v.error:
            lines.append(f"{v.name}: {v.error}")
        lines += [f"{v.name}: {g.reason}" for g in v.gates if not g.passed]
    return lines


def comparison_markdown(recipe, comp: Comparison, records: list[dict]) -> str:
    cols = columns(comp)
    heads = ["candidate", "method", "gates"] + [h for _, h, _ in cols]
    lines = [f"# {recipe.name}: candidates vs baseline `{comp.baseline}`", ""]
    if recipe.card.quality or recipe.card.latency or recipe.card.cost:
        lines += ["## Trade-off card", "", "| dimension | target |", "| --- | --- |"]
        for k in ("quality", "latency", "cost"):
            if getattr(recipe.card, k):
                lines.append(f"| {k} | {getattr(recipe.card, k)} |")
        lines.append(f"| rollback | {recipe.card.rollback_to or comp.baseline} |")
        lines.append("")
    lines += ["## Comparison", "", f"Recovery in brackets{latency_n(comp)}{scored_in(comp)}{arithmetic(comp)}.", "", "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for v in comp.candidates:
        name = f"**{v.name}** ★" if v.name == comp.recommended else v.name
        lines.append("| " + " | ".join([name, v.method, _status(v, comp)] + [_cell(m, f, v) for m, _, f in cols]) + " |")
    lines += ["", f"**Recommended:** {comp.recommended or 'none'} — {comp.why}", ""]
    ks = {v.name: kernel_label(v.kernels) for v in comp.candidates if v.kernels is not None}
    if ks:  # what each candidate's matmuls ran on (records from before the field have none)
        lines += ["Kernels: " + "; ".join(f"`{n}` {k}" for n, k in ks.items()) + ".", ""]
    lines += mixed_lines(records)
    lines += ["## Gates", ""]
    for v in comp.candidates:
        for g in v.gates:
            lines.append(f"- {'✅' if g.passed else '❌'} `{v.name}` {g.rule} on `{g.metric}`: {g.reason}")
        if v.error:
            lines.append(f"- ❌ `{v.name}`: {v.error}")
    by_name = {r["name"]: r for r in records}
    base_reg = (by_name.get(comp.baseline, {}).get("quality") or {}).get("regression")
    if base_reg:
        from .regression import flips

        lines += ["", "## Regression set: cases that flipped against the baseline", ""]
        for v in comp.candidates:
            reg = (by_name.get(v.name, {}).get("quality") or {}).get("regression")
            if reg and v.name != comp.baseline:
                f = flips(reg, base_reg)
                lines.append(f"- `{v.name}`: broke {f['broke'] or 'none'}; fixed {f['fixed'] or 'none'}")
    ppl = next((r["quality"]["perplexity"]["protocol"] for r in records if (r.get("quality") or {}).get("perplexity")), None)
    if ppl:
        lines += ["", "## Protocol", "", f"- perplexity: {ppl}"]
    if recipe.evaluation.workload:
        lines.append(f"- workload: {recipe.evaluation.workload.model_dump(mode='json')}")
    return "\n".join(lines) + "\n"


def mixed_lines(records: list[dict]) -> list[str]:
    """What each mixed candidate's allocation gave: units per width, size, average bits, the bit map."""
    out = []
    for r in records:
        m = r.get("mixed")
        if not m:
            continue
        counts = ", ".join(f"{n}×{b}-bit" for b, n in (m.get("units_per_bits") or {}).items() if n)
        above = sorted(u for u, b in (m.get("bits") or {}).items() if b != m.get("base_bits"))
        out.append(f"Mixed `{r['name']}` ({m.get('algorithm')}, budget {m.get('budget')}): {counts}; "
                   f"{m.get('size_mb')} MB predicted, {m.get('avg_bits')} bits on average; "
                   f"predicted loss +{m.get('predicted_loss_increase')} nats "
                   f"(+{m.get('predicted_loss_increase_all_lowest')} with every unit at the lowest width). "
                   f"Not at {m.get('base_bits')} bits: "
                   + (", ".join(f"`{u.removeprefix('model.layers.')}`={m['bits'][u]}" for u in above) or "none") + ".")
        out.append("")
    return out
