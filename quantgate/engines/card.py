"""Pure: the engine-selection card — goal, workload, constraints, the format matrix, the pairs
with their figures, the recommendation and runner-up with reasons, failure modes, operations
(observability, load-test protocol, rollback path) — as a JSON-ready dict and as Markdown.

Everything here is a function of the records the matrix wrote (pairs, cells, context), so the
card can be rebuilt from a run folder and tested on hand-made figures. `deployment_of()` turns
the recommended pair into what a serving manifest takes (engine, its arguments, a provider).
"""

from __future__ import annotations

import json
import shlex

from ..engine_spec import KINDS

GOALS = {
    "latency": "lowest P95 end-to-end latency (TTFT and TPOT both count) among pairs meeting the SLOs",
    "throughput": "highest load within the SLOs (the SLO-rate search; the knee of the concurrency sweep where "
                  "it was not searched), then most goodput (requests/s meeting the SLOs) there",
    "cost": "fewest $ per 1M output tokens at the highest load within the SLOs (the machine's $/hour over the "
            "tokens it writes there), then the highest load",
}
COLUMNS = ("pair", "format", "kernel", "start s", "peak MB", "TTFT p50/p95 ms", "TPOT p50/p95 ms",
           "E2E p95 ms", "out tok/s", "goodput rps", "SLO att.", "err/timeout", "knee c (goodput)",
           "max SLO load (goodput)", "$/1M out", "quality", "load")


# ------------------------------------------------------------------------------ ranking
def pair_id(p: dict) -> str:
    return f"{p['artifact']['name']} @ {p['engine']}"


def card_attainment(card: dict) -> float:
    """The share of requests a card's pairs had to bring within the SLOs."""
    return card.get("attainment") or (card.get("sweep") or {}).get("min_attainment", 0.95)


def slo_load(p: dict) -> float | None:
    """The highest rate (or concurrency) at which the pair met the SLOs, if it was searched."""
    return (p.get("slo_rate") or {}).get("max_value")


def _searched(p: dict) -> bool:
    return (p.get("slo_rate") or {}).get("status") not in (None, "unresolved") or slo_load(p) is not None


def _meets(p: dict, min_attainment: float, goal: str = "latency") -> bool:
    if goal != "latency" and _searched(p):  # ranked on the search: it met them at some probed load
        return slo_load(p) is not None
    m = p.get("metrics") or {}
    att = m.get("slo_attainment")
    return (att is not None and att >= min_attainment and not m.get("error_rate") and not m.get("timeout_rate"))


def _key(p: dict, goal: str):
    m = p.get("metrics") or {}
    inf = float("inf")
    if goal in ("throughput", "cost"):
        k, r = p.get("knee") or {}, p.get("slo_rate") or {}
        goodput = r.get("goodput_rps") or k.get("goodput_rps") or m.get("goodput_rps") or 0.0
        load = (-(slo_load(p) or 0.0), -goodput, -(r.get("output_tok_s") or k.get("output_tok_s")
                                                   or m.get("output_tok_s") or 0.0), m.get("e2e_p95_ms") or inf)
        if goal == "cost":
            usd = r.get("usd_per_1m_output_tokens") if slo_load(p) is not None else m.get("usd_per_1m_output_tokens")
            return (usd if usd is not None else inf, *load)
        return load
    return (m.get("e2e_p95_ms") or inf, m.get("ttft_p95_ms") or inf, -(m.get("output_tok_s") or 0.0))


def rank(pairs: list[dict], goal: str, min_attainment: float = 0.95) -> tuple[list[dict], list[dict]]:
    """(ranked eligible pairs, excluded pairs with a `why_excluded`). Eligible: measured, and not
    failed by the quality gates; pairs meeting the SLOs rank before pairs that do not."""
    ranked, excluded = [], []
    for p in pairs:
        if not p.get("measured"):
            excluded.append({**p, "why_excluded": p.get("error") or "not measured"})
        elif (p.get("quality") or {}).get("engine_failed"):
            excluded.append({**p, "why_excluded": f"its answers on {p['engine']} fail the recipe's regression "
                                                  f"gate: {p['quality']['engine_failed']}"})
        elif (p.get("quality") or {}).get("passed") is False:
            excluded.append({**p, "why_excluded": "failed the recipe's quality gates (compare.json)"})
        else:
            ranked.append(p)
    # a pair whose quality was never gated (an extra, or no compare.json yet) ranks after gated passes
    ranked.sort(key=lambda p: (not _meets(p, min_attainment, goal), (p.get("quality") or {}).get("passed") is not True,
                               _key(p, goal)))
    return ranked, excluded


def _fmt(v, nd=0, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and v == float("inf"):
        return "∞"
    return f"{v:,.{nd}f}{unit}"


def _load_text(r: dict | None) -> str:
    """A search's answer in words: '2.44 req/s (3.05 missed)', '≥ 16 req/s', '< 0.25 req/s'."""
    if not r:
        return "–"
    unit, mx, nxt = r.get("unit", "req/s"), r.get("max_value"), r.get("next_value")
    if mx is None:
        return f"< {nxt:g} {unit}" if nxt is not None else "–"
    if r.get("status") == "all_pass":
        return f"≥ {mx:g} {unit} (the top of the range)"
    if r.get("status") == "unresolved":
        return f"{mx:g}–{nxt:g} {unit} (probes ran out)" if nxt is not None else f"≥ {mx:g} {unit}"
    return f"{mx:g} {unit} ({nxt:g} missed)"


def _why(best: dict, other: dict | None, goal: str, min_attainment: float) -> str:
    m = best["metrics"]
    parts = []
    if goal == "latency":
        parts.append(f"P95 E2E {_fmt(m.get('e2e_p95_ms'))} ms, P95 TTFT {_fmt(m.get('ttft_p95_ms'))} ms, "
                     f"P50 TPOT {_fmt(m.get('tpot_p50_ms'), 1)} ms")
    elif slo_load(best) is not None:
        r = best["slo_rate"]
        if goal == "cost":
            parts.append(f"{_fmt(r.get('usd_per_1m_output_tokens'), 3)} $ per 1M output tokens at its highest "
                         f"SLO load")
        parts.append(f"highest load within the SLOs {_load_text(r)}, goodput {_fmt(r.get('goodput_rps'), 2)} req/s "
                     f"there ({_fmt(r.get('output_tok_s'), 1)} tok/s)")
    else:
        k = best.get("knee") or {}
        parts.append(f"goodput {_fmt(k.get('goodput_rps') or m.get('goodput_rps'), 2)} req/s at concurrency "
                     f"{k.get('concurrency', '–')} ({_fmt(k.get('output_tok_s') or m.get('output_tok_s'), 1)} tok/s)")
    if other is not None:
        om = other["metrics"]
        if goal == "latency" and m.get("e2e_p95_ms") and om.get("e2e_p95_ms"):
            parts.append(f"{1 - m['e2e_p95_ms'] / om['e2e_p95_ms']:.0%} lower P95 E2E than {pair_id(other)}")
        elif goal in ("throughput", "cost") and slo_load(best) and slo_load(other):
            parts.append(f"{slo_load(best) / slo_load(other):.2f}× the SLO load of {pair_id(other)}")
        elif goal == "throughput":
            a = (best.get("knee") or {}).get("goodput_rps") or m.get("goodput_rps")
            b = (other.get("knee") or {}).get("goodput_rps") or om.get("goodput_rps")
            if a and b:
                parts.append(f"{a / b:.2f}× the goodput of {pair_id(other)}")
    if goal != "latency" and _searched(best):
        parts.append("meets the SLOs there" if _meets(best, min_attainment, goal)
                     else "NO pair meets the SLOs at any load probed; this one misses them least")
    else:
        parts.append("meets the SLOs under the workload" if _meets(best, min_attainment)
                     else "NO pair meets the SLOs under the workload; this one misses them least")
    if (best.get("quality") or {}).get("passed") is None:
        parts.append("quality not gated yet (no compare.json: run `quantgate run` first)")
    return "; ".join(parts)


def recommend(pairs: list[dict], goal: str, min_attainment: float = 0.95) -> dict:
    ranked, excluded = rank(pairs, goal, min_attainment)
    if not ranked:
        return {"recommended": None, "runner_up": None, "why": "no pair was measured", "ranking": [],
                "excluded": [{"pair": pair_id(p), "why": p["why_excluded"]} for p in excluded]}
    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    why = _why(best, runner, goal, min_attainment)
    if (best.get("quality") or {}).get("passed") is True:
        better = [p for p in ranked[1:] if (p.get("quality") or {}).get("passed") is None
                  and _meets(p, min_attainment, goal) and _key(p, goal) < _key(best, goal)]
        if better:
            why += ("; " + ", ".join(pair_id(p) for p in better) + " measured better but "
                    + ("its" if len(better) == 1 else "their") + " quality is not gated (not a recipe candidate, "
                    "or not compared yet)")
    return {
        "recommended": pair_id(best), "why": why,
        "runner_up": pair_id(runner) if runner else None,
        "runner_up_why": (_why(runner, None, goal, min_attainment) + f"; ranks below {pair_id(best)}") if runner else None,
        "ranking": [pair_id(p) for p in ranked],
        "excluded": [{"pair": pair_id(p), "why": p["why_excluded"]} for p in excluded],
    }


# ---------------------------------------------------------------------------- deployment
def deployment_of(pair: dict, device: str = "cpu") -> dict:
    """What the serving manifest takes for a pair: `engine` (the EngineSpec as the pair ran, its
    kernel included), the artifact, a provider spec (`Deployment.provider`: openai for servers, local
    in process), and for a launched engine the `command` it starts with, for people to read."""
    art, kind = pair["artifact"], pair["engine_kind"]
    k = KINDS[kind]
    if k.provider == "local":  # in process
        return {"engine": _compact({"kind": kind, "device": device, "threads": pair.get("threads"),
                                    "kernel": pair.get("kernel")}),
                "artifact": art["path"], "provider": {"kind": "local", "model": art["path"], "device": device}}
    if not k.launched:  # a server someone else runs
        return {"engine": _compact({"kind": kind, "kernel": pair.get("kernel")}), "artifact": art["path"],
                "provider": {"kind": "openai", "base_url": pair["base_url"].rstrip("/") + "/v1",
                             "model": pair.get("served_model") or art["name"]}}
    cmd = pair.get("serve_command") or {}
    port = cmd.get("port", 8000)
    if pair.get("engine_spec"):
        engine = dict(pair["engine_spec"])
    else:  # a card written before specs were stored: its command line, used verbatim
        argv = list(cmd.get("argv") or [])
        engine = {"kind": kind, "argv": argv, "env": dict(cmd.get("env") or {}), "python": argv[0] if argv else None}
    engine = _compact({**engine, "device": device, "port": port, "kernel": pair.get("kernel")})
    out = {"engine": engine, "artifact": art["path"],
           "provider": {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": art["name"]}}
    if cmd.get("argv"):
        out["command"] = {"argv": cmd["argv"], "env": cmd.get("env", {})}
    return out


def _compact(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def recommended_deployment(card: dict) -> dict | None:
    """The recommended pair of a card (dict, as written to card.json) as a deployment."""
    rec = card.get("recommendation", {}).get("recommended")
    for p in card.get("pairs", []):
        if pair_id(p) == rec:
            return deployment_of(p, card.get("constraints", {}).get("device", "cpu"))
    return None


# ---------------------------------------------------------------------------------- card
def build_card(context: dict, cells: list[dict], pairs: list[dict]) -> dict:
    """context: recipe, recipe_hash, goal, workload, sweep, constraints, rollback_to, command, ..."""
    goal = context["goal"]
    min_att = card_attainment(context)
    rec = recommend(pairs, goal, min_att)
    by_id = {pair_id(p): p for p in pairs}
    best = by_id.get(rec["recommended"])
    rollback = _rollback(context.get("rollback_to"), pairs, goal, min_att, context.get("constraints", {}))
    return {
        "card": "engine-selection", "version": 1, **{k: context[k] for k in context if k != "goal"},
        "goal": {"kind": goal, "rule": GOALS[goal]},
        "matrix": cells, "pairs": pairs, "recommendation": rec,
        "deployment": deployment_of(best, context.get("constraints", {}).get("device", "cpu")) if best else None,
        "rollback": rollback,
        "failure_modes": {pair_id(p): p.get("failure_modes", []) for p in pairs if p.get("failure_modes")},
    }


def _rollback(target: str | None, pairs: list[dict], goal: str, min_att: float, constraints: dict) -> dict:
    if not target:
        return {"candidate": None, "how": "no rollback target in the recipe (card.rollback_to); set one"}
    ranked, _ = rank([p for p in pairs if p["artifact"]["name"] == target], goal, min_att)
    if not ranked:
        return {"candidate": target, "pair": None,
                "how": f"'{target}' was not measured on any engine here; its last known deployment stays the fallback"}
    p = ranked[0]
    return {"candidate": target, "pair": pair_id(p), "deployment": deployment_of(p, constraints.get("device", "cpu")),
            "how": f"`quantgate rollback` restores the previous manifest deployment; the measured fallback is "
                   f"{pair_id(p)} (P95 E2E {_fmt(p['metrics'].get('e2e_p95_ms'))} ms under the same workload)"}


# ------------------------------------------------------------------------------ markdown
def _graded(p: dict) -> str:
    """The regression set as this engine answered it, beside the gate verdict."""
    eq, reg = p.get("engine_quality"), p.get("regression")
    if eq:
        return f" (regression {eq['passed_cases']}/{eq['total']} here, baseline {_fmt((eq['baseline'] or 0) * 100, 0, '%')})"
    return f" (regression {reg['passed']}/{reg['total']} here)" if reg else ""


def _row(p: dict) -> list[str]:
    m, lr, k = p.get("metrics") or {}, p.get("launch") or {}, p.get("knee")
    q = (p.get("quality") or {}).get("passed")
    return [
        pair_id(p), p["artifact"].get("label") or p["artifact"]["format"], p.get("kernel") or "–",
        _fmt(lr.get("startup_s"), 1), _fmt(lr.get("peak_rss_mb") if not lr.get("peak_gpu_mb") else lr["peak_gpu_mb"]),
        f"{_fmt(m.get('ttft_p50_ms'))} / {_fmt(m.get('ttft_p95_ms'))}",
        f"{_fmt(m.get('tpot_p50_ms'), 1)} / {_fmt(m.get('tpot_p95_ms'), 1)}", _fmt(m.get("e2e_p95_ms")),
        _fmt(m.get("output_tok_s"), 1), _fmt(m.get("goodput_rps"), 2),
        _fmt((m.get("slo_attainment") or 0) * 100, 0, "%") if m.get("slo_attainment") is not None else "–",
        f"{_fmt((m.get('error_rate') or 0) * 100, 0, '%')} / {_fmt((m.get('timeout_rate') or 0) * 100, 0, '%')}",
        f"{k['concurrency']} ({_fmt(k.get('goodput_rps'), 2)})" if k else ("none" if p.get("sweep") else "–"),
        (f"{_load_text(p['slo_rate'])} ({_fmt(p['slo_rate'].get('goodput_rps'), 2)})" if slo_load(p) is not None
         else _load_text(p.get("slo_rate"))),
        _fmt(m.get("usd_per_1m_output_tokens"), 3), {True: "pass", False: "FAIL", None: "–"}[q] + _graded(p),
        p.get("load_avg") or "–",
    ]


def _table(header, rows) -> list[str]:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in esc)]


def _short(text: str, path: str | None, n: int = 150) -> str:
    if path:
        text = text.replace(path, "<artifact>")
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell_text(c: dict) -> str:
    o, e, path = c.get("observed") or {}, c.get("expected") or {}, (c.get("artifact") or {}).get("path")
    if o.get("loads") is True:
        return f"✓ {o.get('kernel') or e.get('kernel') or 'loads'}"
    if o.get("loads") is False:
        return f"✗ {_short(o.get('reason') or e.get('reason') or 'failed', path)}"
    if o.get("reason"):  # not tried, and why (the engine is not installed, ...)
        return f"– {_short(o['reason'], path)}"
    return {"yes": f"(✓) {e.get('kernel') or ''} — not tried", "no": f"(✗) {_short(e.get('reason', ''), path)} — not tried",
            }.get(e.get("status"), "? not tried")


def render_markdown(card: dict) -> str:
    w, c, rec = card.get("workload") or {}, card.get("constraints") or {}, card["recommendation"]
    slo = w.get("slo") or {}
    mix = ", ".join(f"{m['name']} {m.get('weight', 1):g}: {m['prompt_tokens']}→{m['output_tokens']} tok"
                    for m in w.get("mix", []))
    L = [f"# Engine-selection card — {card.get('recipe')}", "",
         f"Recipe hash `{str(card.get('recipe_hash', ''))[:12]}` · generated {card.get('generated_at', '')} · "
         f"`{card.get('command', 'quantgate engines')}`", "",
         "## Goal", "", f"**{card['goal']['kind']}** — {card['goal']['rule']}.",
         "SLOs: " + (", ".join(f"{k.split('_')[0].upper()} ≤ {_fmt(v)} ms" for k, v in slo.items()
                               if v is not None and k != "attainment")
                     or "none set (every successful request counts)") + "; a pair meets them when ≥ "
         f"{card_attainment(card):.0%} of requests do, with no errors or timeouts.", "",
         "## Workload", "",
         f"- {w.get('requests')} requests, arrival `{w.get('arrival')}`, concurrency {w.get('concurrency')}"
         + (f", rate {w.get('rate')} req/s" if w.get("rate") else "")
         + f", {w.get('warmup_requests')} warm-up, timeout {w.get('timeout_s')} s, seed {w.get('seed')}",
         f"- mix (weight: prompt→output): {mix}; output length forced with `ignore_eos` where the engine honours it",
         f"- prompts: {card.get('prompts', 'corpus eval split')}",
         f"- concurrency sweep: levels {(card.get('sweep') or {}).get('levels', '–')}, "
         f"{(card.get('sweep') or {}).get('requests_per_level') or '3 × level (≥ 6)'} requests per level", "",
         "## Constraints", "",
         f"- device: {c.get('device', 'cpu')}; GPU: {c.get('gpu') or 'none'}",
         f"- CPU: {c.get('cpu_model', '?')}, {c.get('cores', '?')} cores usable; memory {_fmt(c.get('memory_gb'), 1)} GB",
         f"- 1-min load average while measuring: {c.get('load_avg', '–')} (per pair in the `load` column; a shared "
         "machine: compare pairs side by side, not with figures from elsewhere)",
         f"- network: {c.get('network', 'loopback; client and server on one machine')}", ""]
    eng = sorted({x["engine"] for x in card.get("matrix", [])})
    arts = list(dict.fromkeys(x["artifact"]["name"] for x in card.get("matrix", [])))
    if eng:
        cell = {(x["artifact"]["name"], x["engine"]): x for x in card["matrix"]}
        label = {x["artifact"]["name"]: x["artifact"].get("label", "") for x in card["matrix"]}
        L += ["## Format compatibility", "", "✓ loaded (kernel from the engine's log) · ✗ did not load (the "
              "engine's message) · (✓)/(✗) what the table expects, not tried", ""]
        L += _table(["artifact", *eng], [[f"{a} ({label[a]})", *(_cell_text(cell[(a, e)]) if (a, e) in cell else "–"
                                                                  for e in eng)] for a in arts])
        L.append("")
        odd = [x for x in card["matrix"] if x.get("agrees") is False]
        for x in odd:
            L.append(f"- table disagreement: {x['artifact']['name']} on {x['engine']} — the table says "
                     f"{x['expected']['status']}, the engine {'loaded it' if x['observed']['loads'] else 'refused it'}")
        if odd:
            L.append("")
    pairs = card.get("pairs", [])
    measured = [p for p in pairs if p.get("measured")]
    L += ["## Pairs measured", ""]
    L += _table(COLUMNS, [_row(p) for p in measured]) if measured else ["No pair was measured."]
    L += ["", "Peak MB: the engine's process tree (summed RSS; GPU memory where a GPU served). Start s: spawn "
          "to first healthy answer (in-process: model load).", ""]
    swept = [p for p in measured if p.get("sweep")]
    if swept:
        L += ["### Concurrency sweep", ""]
        rows = []
        for p in swept:
            for s in p["sweep"]:
                rows.append([pair_id(p), s["concurrency"], s["requests"],
                             _fmt((s.get("attainment") or 0) * 100, 0, "%") if s.get("attainment") is not None else "–",
                             _fmt(s.get("ttft_p95_ms")), _fmt(s.get("tpot_p95_ms"), 1), _fmt(s.get("output_tok_s"), 1),
                             _fmt(s.get("goodput_rps"), 2), "✓" if s.get("meets") else "✗"])
        L += _table(["pair", "c", "requests", "SLO att.", "TTFT p95", "TPOT p95", "out tok/s", "goodput", "meets"], rows)
        L.append("")
    searched = [p for p in measured if (p.get("slo_rate") or {}).get("probed")]
    if searched:
        sr = card.get("slo_rate") or {}
        L += ["### Highest load within the SLOs", "",
              f"Bisection over {sr.get('axis', 'rate')} {_fmt(sr.get('low'), 2)}…{_fmt(sr.get('high'), 2)} (each step × "
              f"{_fmt(sr.get('growth'), 2)}), at most {sr.get('max_probes', '–')} probes a pair; one probe is "
              "`quantgate loadtest` at that value (same arrivals, mix, seed and SLOs); the answer is exact to one "
              "step: the value above it missed.", ""]
        rows = []
        for p in searched:
            r = p["slo_rate"]
            for s in r["probed"]:
                rows.append([pair_id(p), f"{s['value']:g} {r.get('unit', '')}", s["requests"],
                             _fmt((s.get("attainment") or 0) * 100, 0, "%") if s.get("attainment") is not None else "–",
                             _fmt(s.get("ttft_p95_ms")), _fmt(s.get("tpot_p95_ms"), 1), _fmt(s.get("goodput_rps"), 2),
                             "✓" if s.get("meets") else "✗"])
            rows.append([f"**{pair_id(p)}**", f"**{_load_text(r)}**", "", "", "", "", _fmt(r.get("goodput_rps"), 2), ""])
        L += _table(["pair", "load", "requests", "SLO att.", "TTFT p95", "TPOT p95", "goodput", "meets"], rows)
        L.append("")
    if card.get("plots"):
        L += ["Plots: " + ", ".join(f"`{x}`" for x in card["plots"]), ""]
    L += ["## Recommendation", ""]
    if rec.get("recommended"):
        L += [f"**{rec['recommended']}** — {rec['why']}.", ""]
        if rec.get("runner_up"):
            L += [f"Runner-up: **{rec['runner_up']}** — {rec['runner_up_why']}.", ""]
        d = card.get("deployment")
        if d:
            L += ["Deployment for the serving manifest (`Deployment.provider`):", ""]
            if d.get("command"):
                env = " ".join(f"{k}={shlex.quote(v)}" for k, v in d["command"]["env"].items())
                L += ["```sh", (env + " " if env else "") + shlex.join(d["command"]["argv"]), "```"]
            L += ["```json", json.dumps(d["provider"]), "```", ""]
    else:
        L += [f"No recommendation: {rec.get('why')}.", ""]
    for x in rec.get("excluded", []):
        L.append(f"- excluded {x['pair']}: {x['why']}")
    L += ["", "## Failure modes seen", ""]
    fm = card.get("failure_modes") or {}
    L += [f"- **{pid}** — {f['kind']}: {f['detail']}" for pid, fs in fm.items() for f in fs] or ["None seen."]
    obs = sorted({p["engine"] + (": Prometheus /metrics" if (p.get("launch") or {}).get("metrics_endpoint") else
                                 ": no /metrics endpoint") for p in measured if p["engine_kind"] != "transformers"})
    rb = card.get("rollback") or {}
    L += ["", "## Operations", "",
          "- observability: per request TTFT, TPOT, ITL, E2E, tokens in/out, outcome; per pair the P50/P95/P99, "
          "throughput, goodput, SLO attainment, error and timeout rates, peak memory, startup time"
          + (f"; engines: {'; '.join(obs)}" if obs else "") + "; engine logs under `engines/logs/`",
          "- load-test protocol: quantgate's one load generator (`run_load`), closed loop at the workload's "
          "concurrency after warm-up, same seeded prompts and mix for every pair, streaming with usage, "
          "client on loopback; then the sweep levels on the same warm server",
          f"- rollback path: {rb.get('how', '–')}", ""]
    return "\n".join(L)
