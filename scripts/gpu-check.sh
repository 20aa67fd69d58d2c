#!/usr/bin/env bash
# The prepared GPU check of issue #17 (bench/gpu_check.py does the work; `--help` says more):
#   scripts/gpu-check.sh plan          here: build .gpu/callN/ (wheels + the model in parts), print the calls
#   scripts/gpu-check.sh stage         on the device, each call but the last
#   scripts/gpu-check.sh run           on the device, the last call: items 1-4 → $OUT/gpu-check.json + .log
#   scripts/gpu-check.sh collect DIR   here: the returned files into bench/results/gpu/
#   scripts/gpu-check.sh dry-run       here or CI: the same items on CPU, tiny shapes, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
# here the project's venv; on the device machine its image's python3 (no .venv travels)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" bench/gpu_check.py "$@"
