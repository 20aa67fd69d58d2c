#!/usr/bin/env bash
# llama.cpp's server (llama-cpp-python[server]) in its own venv. It builds llama.cpp from source:
# about 15 minutes on 2 cores, so CI does not run it (its test skips and says how to set it up).
set -euo pipefail
HOME_DIR=${QUANTGATE_ENGINES_HOME:-$HOME/.cache/quantgate/engines}
V=$HOME_DIR/llamacpp-venv
mkdir -p "$HOME_DIR/src"
if [ ! -x "$V/bin/python" ]; then python3 -m venv "$V"; fi
"$V/bin/python" -m pip install -q --upgrade pip
# the source archive also carries llama.cpp's HF→GGUF converter (vendor/llama.cpp/convert_hf_to_gguf.py)
"$V/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$HOME_DIR/src"
CMAKE_BUILD_PARALLEL_LEVEL=2 "$V/bin/python" -m pip install -q "llama-cpp-python[server]==0.3.36"
"$V/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'at $V')"
