"""The comparison plots a reviewer looks at (PNG via matplotlib's Agg backend, no display needed).

  pareto.png   quality vs latency, one point per candidate, colour = cost, the frontier drawn
  latency.png  TTFT / TPOT / E2E percentiles per candidate, side by side
  engines/pareto-slo-rate.png  quality vs the highest load within the SLOs, one point per candidate × engine
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (both lower-is-better). Pure."""
    front = []
    for name, x, y in points:
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in points):
            front.append(name)
    return front


def pareto_plot(rows: list[dict], out: Path, x: str = "e2e_p95_ms", y: str = "perplexity",
                cost: str = "usd_per_1m_output_tokens", recommended: str | None = None) -> Path | None:
    pts = [(r["name"], r["metrics"].get(x), r["metrics"].get(y), r["metrics"].get(cost)) for r in rows]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    costs = [p[3] if p[3] is not None else 0.0 for p in pts]
    sc = ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=costs, cmap="viridis_r", s=120,
                    edgecolors="black", zorder=3)
    fig.colorbar(sc, ax=ax, label=cost.replace("_", " "))
    front = pareto_front([(p[0], p[1], p[2]) for p in pts])
    fp = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fp], [p[2] for p in fp], "--", color="grey", zorder=2, label="Pareto front")
    _label(ax, [p[:3] for p in pts], recommended)
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    from matplotlib.ticker import NullFormatter

    for values, axis, setter in ((xs, ax.xaxis, ax.set_xscale), (ys, ax.yaxis, ax.set_yscale)):
        if min(values) > 0 and max(values) / min(values) > 5:
            setter("log")  # one very slow or very bad candidate must not squash the others into a corner
            axis.set_minor_formatter(NullFormatter())
    return _finish(plt, fig, ax, out, f"{x} (lower is better)", f"{y} (lower is better)",
                   "quality vs latency (colour: cost)")


def _label(ax, pts: list[tuple[str, float, float]], recommended: str | None) -> None:
    # near-identical points (e.g. GPTQ and AWQ at the same bits) get labels on alternating sides
    offsets = [(12, 14), (12, -20), (-95, 14), (-95, -20)]
    for i, (name, px, py) in enumerate(sorted(pts, key=lambda p: (p[1], p[2]))):
        ax.annotate(name + (" ★" if name == recommended else ""), (px, py), textcoords="offset points",
                    xytext=offsets[i % len(offsets)], fontsize=9, arrowprops={"arrowstyle": "-", "color": "grey"},
                    fontweight="bold" if name == recommended else "normal")


def _finish(plt, fig, ax, out: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.margins(0.18)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def slo_rate_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names no other point beats on both: more load within the SLOs, lower perplexity. Pure."""
    return pareto_front([(name, -rate, ppl) for name, rate, ppl in points])


def slo_rate_plot(points: list[tuple[str, float, float]], out: Path, unit: str = "req/s",
                  recommended: str | None = None) -> Path | None:
    """Quality (the candidate's perplexity) against the highest load each candidate × engine pair
    sustained within the SLOs; the frontier drawn. `points`: (pair, load, perplexity)."""
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=120, edgecolors="black", zorder=3)
    front = set(slo_rate_front(points))
    fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fp], [p[2] for p in fp], "--", color="grey", zorder=2, label="Pareto front")
    _label(ax, points, recommended)
    return _finish(plt, fig, ax, out, f"highest load within the SLOs ({unit}, higher is better)",
                   "perplexity (lower is better)", "quality vs the highest load within the SLOs, per candidate × engine")


def latency_plot(rows: list[dict], out: Path) -> Path | None:
    metrics = ("ttft", "tpot", "e2e")
    qs = ("p50", "p95", "p99")
    rows = [r for r in rows if any(r["metrics"].get(f"{m}_p50_ms") is not None for m in metrics)]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    width = 0.8 / len(qs)
    for ax, m in zip(axes, metrics):
        for i, q in enumerate(qs):
            vals = [r["metrics"].get(f"{m}_{q}_ms") or 0.0 for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], vals, width, label=q.upper())
        ax.set_xticks([j + width for j in range(len(rows))])
        ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{m.upper()} (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("latency percentiles per candidate under the recipe's workload")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sensitivity_plot(table: dict, bits: dict[str, int], out: Path, title: str = "") -> Path | None:
    """A mixed candidate's sensitivity, layers × unit kinds, one panel per quantized bit choice
    (colour: log10 of the predicted loss increase), and a last panel with the bits it was given."""
    import math
    import re

    from .allocation import unit_name

    scores = table.get("scores") or {}
    unit_of = {}  # linear → (layer, kind of unit, unit): q/k/v and gate/up share their unit's bits
    for name in scores:
        if m := re.search(r"\.layers\.(\d+)\.", name):
            unit = unit_name(name)
            unit_of[name] = (int(m.group(1)), unit.rsplit(".", 1)[1], unit)
    if not unit_of:
        return None
    layers = sorted({v[0] for v in unit_of.values()})
    kinds = sorted({v[1] for v in unit_of.values()})
    choices = [int(c) for c in table["choices"] if int(c) < 16]
    plt = _plt()
    fig, axes = plt.subplots(1, len(choices) + 1, figsize=(2.6 * (len(choices) + 1) + 1.5, 0.22 * len(layers) + 2))
    for ax, c in zip(axes, choices):
        grid = [[0.0] * len(kinds) for _ in layers]
        for name, (layer, kind, _) in unit_of.items():
            grid[layers.index(layer)][kinds.index(kind)] += scores[name][str(c)]
        im = ax.imshow([[math.log10(max(v, 1e-9)) for v in row] for row in grid], aspect="auto", cmap="magma_r")
        ax.set_title(f"{c}-bit: log10 ΔL")
        fig.colorbar(im, ax=ax, fraction=0.08)
    ax = axes[-1]
    grid = [[float("nan")] * len(kinds) for _ in layers]
    for _, (layer, kind, unit) in unit_of.items():
        grid[layers.index(layer)][kinds.index(kind)] = bits.get(unit, float("nan"))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_title("bits given")
    fig.colorbar(im, ax=ax, fraction=0.08)
    for a in axes:
        a.set_xticks(range(len(kinds)))
        a.set_xticklabels(kinds, rotation=45, ha="right", fontsize=7)
        a.set_yticks(range(len(layers)))
        a.set_yticklabels(layers, fontsize=6)
        a.set_ylabel("layer")
    fig.suptitle(title or f"sensitivity ({table.get('measure')}, {table.get('windows')} windows)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
