#!/usr/bin/env bash
# Install jaxllama with its dev extras (pytest, llama-cpp-python) into ./.venv, from nothing.
# llama-cpp-python compiles llama.cpp (~7 min on 2 cores; pip caches the wheel afterwards).
# The native build dies with SIGILL on CPUs that report AMX (see shared REFERENCE.md §2),
# so build for a fixed AVX-512 target unless CMAKE_ARGS is already set.
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "installed into $(pwd)/.venv"
