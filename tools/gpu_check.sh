#!/usr/bin/env bash
# The checks to run on a lent accelerator machine, in two steps that fit a short lease:
#   tools/gpu_check.sh bench OUTDIR   versions, then `jaxllama bench --only device,fill` on the default model
#                                     in $JAXLLAMA_CACHE or, without it, on a random model of the same shapes
#                                     and types (tools/same_shape_model.py): the speed is the same
#   tools/gpu_check.sh tests OUTDIR   the llama.cpp-free tests: the default model's (if present), then the
#                                     tiny random models
# Logs and the benchmark JSON go to OUTDIR. Each part has its own time limit, so one slow part
# cannot take the others' time. Nothing here is needed to build or test jaxllama.
set -u
what=$1 out=$2
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 JAXLLAMA_CACHE=${JAXLLAMA_CACHE:-/tmp/jaxllama-cache}
mkdir -p "$out" "$JAXLLAMA_CACHE"
py=${PYTHON:-python3}
tests() {  # tests() LIMIT_S LOG ARGS...: pytest, llama.cpp-free, each test at most 150 s
  local limit=$1 log=$2; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$limit" $py -m pytest -q -m "not llamacpp" -p no:cacheprovider \
    -o addopts="" -rfE --timeout 150 "$@" 2>&1 | tee "$out/$log" | tail -40
}
have_model() {  # the default model is in $JAXLLAMA_CACHE, hash-checked (nothing is downloaded here)
  $py -c "from jaxllama.gguf.default_model import default_model_path as p; p(download=False)" 2>/dev/null
}
case $what in
bench)  # versions, then the benchmark (CPU kernels off: they are not used on accelerators) on the default
        # model if present, else on a random one of its shapes
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 | tee "$out/machine.txt"
  $py -c "import jax, jaxlib, flax, gguf, numpy; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'numpy', numpy.__version__, jax.devices())" 2>&1 | tee -a "$out/machine.txt"
  model=$JAXLLAMA_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
  if ! have_model; then
    model=/tmp/same_shape.gguf
    $py tools/same_shape_model.py "$model" | tee "$out/model.txt"
  fi
  JAXLLAMA_KERNELS=0 timeout "${BENCH_LIMIT:-280}" $py -m jaxllama bench --model "$model" --only "${BENCH_SECTIONS:-device,fill}" --repeats "${BENCH_REPEATS:-3}" \
    >"$out/bench.json" 2> >(tee "$out/bench.err" >&2)
  echo "bench exit $?"; cat "$out/bench.json"
  ;;
tests)  # llama.cpp-free tests: with the default model if present, then those on tiny random models
  if have_model; then
    tests "${MODEL_TESTS_LIMIT:-150}" tests_model.log tests/test_weights.py tests/test_generation.py tests/test_long_context.py
  fi
  tests "${TINY_TESTS_LIMIT:-150}" tests_tiny.log tests/test_model.py tests/test_trace.py tests/test_sampling.py \
    tests/test_dequant.py tests/test_saved_params.py
  ;;
*) echo "usage: $0 bench|tests OUTDIR" >&2; exit 2 ;;
esac
