"""quantgate's GPTQ against calling GPTQModel directly: same settings, same calibration tokens.

Both run as fresh processes, one after the other, on the same machine, in the same run:
  toolkit: `quantgate quantize RECIPE --only CANDIDATE --force` (what a user runs)
  direct:  a short script that calls GPTQModel.load / quantize / save itself
Reported: wall time of the whole command, peak RSS of the process that quantizes (its own
ru_maxrss in both cases), and perplexity of both checkpoints on the same held-out windows.
Targets: wall ratio ≤ 1.10, peak-memory ratio ≤ 1.15, perplexity equal within 0.5%.

    .venv/bin/python bench/quantize.py [--recipe recipes/smollm2-cpu.yaml] [--candidate gptq-w4g64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as quantgate's CLI does, before torch loads

DIRECT = r'''
import json, os, resource, sys, time
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(4, (os.cpu_count() or 1) // 2))))
job = json.load(open(sys.argv[1]))
from gptqmodel import GPTQModel, QuantizeConfig
windows = json.load(open(job["calibration"]))["windows"]
calib = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
s = job["spec"]
qc = QuantizeConfig(bits=s["bits"], group_size=s["group_size"], sym=s["sym"], desc_act=s["act_order"],
                    act_group_aware=False if s["act_order"] else None, damp_percent=s["damp_percent"],
                    true_sequential=s["true_sequential"], lm_head=False)
t = time.perf_counter()
model = GPTQModel.load(job["source"], qc, device="cpu")
model.quantize(calib, batch_size=1, calibration_sort=None)
model.save(job["out"])
print(json.dumps({"quantize_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return wall, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-cpu.yaml"))
    ap.add_argument("--candidate", default="gptq-w4g64")
    ap.add_argument("--workdir", default=str(REPO / "bench" / "results" / "quantize-ws"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quantize.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from quantgate.evaluate.quality import load_model, perplexity, perplexity_windows
    from quantgate.pipeline import prepare
    from quantgate.workspace import Workspace
    from quantgate.quantize.runner import artifact_dir, candidate_key
    from quantgate.recipe import load_recipe
    from quantgate.util import atomic_write_json

    recipe = load_recipe(args.recipe)
    spec = recipe.candidate(args.candidate)
    if spec.method != "gptq":
        raise SystemExit("this benchmark compares GPTQ; pick a gptq candidate")
    ws = Workspace(Path(args.workdir))
    source, meta, calib_file = prepare(recipe, ws, log=lambda *_: None)  # same tokens for both
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    wall_tool, _ = timed([sys.executable, "-m", "quantgate", "quantize", args.recipe, "--only", spec.name,
                          "--force", "--device", "cpu", "-w", str(ws.root)], env)
    tool_dir = artifact_dir(ws.artifacts, spec, candidate_key(spec, meta["model"]["identity"], meta["calib_hash"]))
    tool_rec = json.loads((tool_dir / "candidate.json").read_text())

    job = ws.root / "direct-job.json"
    direct_dir = ws.root / "direct-out"
    job.write_text(json.dumps({"source": str(source), "calibration": str(calib_file),
                               "spec": spec.model_dump(mode="json"), "out": str(direct_dir)}))
    script = ws.root / "direct.py"
    script.write_text(DIRECT)
    wall_direct, proc = timed([sys.executable, str(script), str(job)], env)
    direct = json.loads(proc.stdout.strip().splitlines()[-1])

    tok = AutoTokenizer.from_pretrained(source)
    windows = perplexity_windows(tok, recipe.evaluation.perplexity)
    ppl_tool = perplexity(load_model(tool_dir), windows).perplexity
    ppl_direct = perplexity(load_model(direct_dir), windows).perplexity

    res = {
        "candidate": spec.name, "calibration": meta["calibration"], "eval_windows": len(windows),
        "toolkit": {"wall_s": wall_tool, "quantize_s": tool_rec["wall_s"], "peak_rss_mb": tool_rec["peak_rss_mb"],
                    "perplexity": ppl_tool},
        "direct": {"wall_s": wall_direct, "quantize_s": direct["quantize_s"], "peak_rss_mb": direct["peak_rss_mb"],
                   "perplexity": ppl_direct},
    }
    res["ratios"] = {
        "wall": wall_tool / wall_direct,
        "peak_rss": tool_rec["peak_rss_mb"] / direct["peak_rss_mb"],
        "perplexity_rel_diff": abs(ppl_tool - ppl_direct) / ppl_direct,
    }
    res["targets_met"] = {"wall<=1.10": res["ratios"]["wall"] <= 1.10,
                          "peak_rss<=1.15": res["ratios"]["peak_rss"] <= 1.15,
                          "perplexity_within_0.5%": res["ratios"]["perplexity_rel_diff"] <= 0.005}
    atomic_write_json(Path(args.out), res)
    print(f"{'':10}{'wall s':>9}{'quantize s':>12}{'peak RSS MB':>13}{'perplexity':>12}")
    for k in ("toolkit", "direct"):
        r = res[k]
        print(f"{k:10}{r['wall_s']:9.1f}{r['quantize_s']:12.1f}{r['peak_rss_mb']:13.0f}{r['perplexity']:12.3f}")
    rt = res["ratios"]
    print(f"ratios: wall {rt['wall']:.3f}  peak RSS {rt['peak_rss']:.3f}  perplexity diff {100 * rt['perplexity_rel_diff']:.2f}%")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in res["targets_met"].items()))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
