#!/usr/bin/env bash
# A second venv with the libraries many users load checkpoints with: transformers 4.57 and
# optimum 1.24 (and auto-gptq 0.7.1 for GPTQ, built without CUDA kernels). The interoperability
# test (tests/e2e/test_interop.py) loads quantgate's 4-bit checkpoints there and compares
# perplexity. Lives at $QUANTGATE_ENGINES_HOME/interop-venv (default ~/.cache/quantgate/engines).
set -euo pipefail
HOME_DIR=${QUANTGATE_ENGINES_HOME:-$HOME/.cache/quantgate/engines}
V=$HOME_DIR/interop-venv
mkdir -p "$HOME_DIR"
if [ ! -x "$V/bin/python" ]; then python3 -m venv "$V"; fi
"$V/bin/python" -m pip install -q --upgrade pip
"$V/bin/python" -m pip install -q "torch==2.13.0"
"$V/bin/python" -m pip install -q "transformers==4.57.*" "optimum==1.24.0" "safetensors" "accelerate"
# auto-gptq has no CPU wheel: build it without its CUDA extension (pure-torch kernels)
# peft < 0.11: auto-gptq 0.7.1 imports a name later peft versions removed
BUILD_CUDA_EXT=0 "$V/bin/python" -m pip install -q --no-build-isolation "auto-gptq==0.7.1" "peft==0.10.0" \
  || echo "auto-gptq 0.7.1 did not install on this machine: GPTQ interop is tested with transformers' own loader only"
"$V/bin/python" -c "import transformers, optimum, torch; print('interop venv: transformers', transformers.__version__, 'torch', torch.__version__, 'at $V')"
