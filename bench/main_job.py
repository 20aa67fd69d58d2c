"""The main job's wall time per stage: where `quantgate run RECIPE` spends its minutes.

Reads the timing record a run writes (RUN/timings.json: each candidate's quantization and
evaluation as the parent saw them, with the evaluation worker's own split into model load,
perplexity, regression, lm-eval, offline timings and the load test), prints a table, and with
`--before` a second record side by side (e.g. the same recipe before a change, or the full recipe
against the quick one). Writes bench/results/main_job.json.

    .venv/bin/python bench/main_job.py WORKSPACE/runs/NAME-HASH [--before OTHER_RUN_OR_TIMINGS_JSON]
    .venv/bin/python bench/main_job.py --run recipes/smollm2-cpu.yaml -w /tmp/ws   # run it, then report

Figures measured on this project's 2-core machine are in README.md ("How long it takes").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("model_load", "perplexity", "regression", "lm_eval", "offline", "load_test")


def load(path: Path) -> dict:
    path = Path(path)
    f = path / "timings.json" if path.is_dir() else path
    if not f.is_file():
        sys.exit(f"{f}: no timing record (run `quantgate run` first; runs write RUN/timings.json)")
    return json.loads(f.read_text())


def rows(timings: dict) -> dict[str, float]:
    """{stage label: seconds}: quantize per candidate, each evaluation part summed over candidates, totals."""
    out: dict[str, float] = {}
    latest: dict[tuple[str, str], dict] = {}
    for s in timings["stages"]:  # a resumed run appends: the latest measured entry of each step counts
        key = (s["stage"], s["candidate"])
        if s.get("status") != "cached" or key not in latest:
            latest[key] = s
    cpu = sum(s.get("cpu_s") or 0.0 for s in latest.values())
    for (stage, cand), s in latest.items():
        if stage == "quantize":
            out[f"quantize {cand}"] = s["wall_s"]
        elif stage == "evaluate":
            out[f"evaluate {cand}"] = s["wall_s"]
            for p, v in (s.get("parts_s") or {}).items():
                out[f"  {p} (all candidates)"] = out.get(f"  {p} (all candidates)", 0.0) + v
        else:
            out[stage] = s["wall_s"]
    out["quantize total"] = sum(v for k, v in out.items() if k.startswith("quantize ") and k != "quantize total")
    out["evaluate total"] = sum(v for k, v in out.items() if k.startswith("evaluate "))
    if "run" in out:
        out["total (quantgate run)"] = out.pop("run")
    if cpu:
        out["worker CPU seconds (all)"] = cpu  # on a busy machine, what the work itself cost
    return out


def table(after: dict[str, float], before: dict[str, float] | None) -> str:
    keys = list(dict.fromkeys([*(before or {}), *after]))
    head = f"{'stage':<36}" + (f"{'before s':>10}" if before else "") + f"{'after s':>10}" + ("   ratio" if before else "")
    lines = [head, "-" * len(head)]
    for k in keys:
        a, b = after.get(k), (before or {}).get(k)
        line = f"{k:<36}" + (f"{b:>10.1f}" if b is not None else (f"{'–':>10}" if before else ""))
        line += f"{a:>10.1f}" if a is not None else f"{'–':>10}"
        if before and a is not None and b:
            line += f"   {a / b:5.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", help="a run folder (WORKSPACE/runs/NAME-HASH) or its timings.json")
    ap.add_argument("--before", help="another run folder or timings.json to compare with")
    ap.add_argument("--run", help="run this recipe first (`quantgate run RECIPE -w WORKSPACE --no-track`)")
    ap.add_argument("-w", "--workspace", default="/tmp/quantgate-bench-main-job")
    args = ap.parse_args(argv)
    if args.run:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "quantgate", "run", args.run, "-w", args.workspace,
                               "--device", "cpu"], cwd=REPO)
        print(f"quantgate run: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s")
        runs = sorted(Path(args.workspace, "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        args.run_dir = str(runs[-1])
    if not args.run_dir:
        ap.error("give a run folder, or --run RECIPE")
    after = rows(load(Path(args.run_dir)))
    before = rows(load(Path(args.before))) if args.before else None
    print(table(after, before))
    res = REPO / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "main_job.json").write_text(json.dumps({"after": after, "before": before, "run": args.run_dir}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
