#!/usr/bin/env bash
# Install jaxllama with its dev extras (pytest, the llama.cpp reference) into ./.venv, from nothing,
# and compile its CPU kernels.
#
# llama-cpp-python compiles llama.cpp (7-10 min on 2 cores, once per CPU flag set). It is built
# for the CPU this runs on: GGML_NATIVE off, AMX off, each AVX/FMA/F16C/AVX-512 option on only
# when /proc/cpuinfo reports it (tools/llamacpp_build.py). The wheel is kept in a directory named
# after the flag set and pip's own cache is bypassed, so a build for another CPU is never reused.
# Set CMAKE_ARGS yourself for another build (CUDA, say); it gets a directory of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
package="$(python3 tools/llamacpp_build.py package)"
wheels="$(python3 tools/llamacpp_build.py wheel-dir)"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building $package for this CPU into $wheels (7-10 minutes, once)"
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$(python3 tools/llamacpp_build.py cmake-args)" \
        .venv/bin/python -m pip wheel --quiet --no-deps --no-cache-dir -w "$wheels.tmp" "$package"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
.venv/bin/python -m pip install --quiet "$wheels"/llama_cpp_python-*.whl
.venv/bin/python -m pip install --quiet -e '.[dev]'
# jaxllama's CPU kernels (quantized matrix-vector products, decode attention; jax.ffi): a few seconds with the system
# C++ compiler, for any x86 CPU (AVX-512, AVX2 or portable code is picked at run time).
.venv/bin/python -m jaxllama.kernels
echo "installed into $(pwd)/.venv"
