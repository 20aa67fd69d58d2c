"""The comparison plots a reviewer looks at (PNG via matplotlib's Agg backend, no display needed).

  pareto.png   quality vs latency, one point per candidate, colour = cost, the frontier drawn
  latency.png  TTFT / TPOT / E2E percentiles per candidate, side by side
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
    # near-identical points (e.g. GPTQ and AWQ at the same bits) get labels on alternating sides
    offsets = [(12, 14), (12, -20), (-95, 14), (-95, -20)]
    for i, (name, px, py, _) in enumerate(sorted(pts, key=lambda p: (p[1], p[2]))):
        ax.annotate(name + (" ★" if name == recommended else ""), (px, py), textcoords="offset points",
                    xytext=offsets[i % len(offsets)], fontsize=9, arrowprops={"arrowstyle": "-", "color": "grey"},
                    fontweight="bold" if name == recommended else "normal")
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    from matplotlib.ticker import NullFormatter

    for values, axis, setter in ((xs, ax.xaxis, ax.set_xscale), (ys, ax.yaxis, ax.set_yscale)):
        if min(values) > 0 and max(values) / min(values) > 5:
            setter("log")  # one very slow or very bad candidate must not squash the others into a corner
            axis.set_minor_formatter(NullFormatter())
    ax.margins(0.18)
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (lower is better)")
    ax.set_title("quality vs latency (colour: cost)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
