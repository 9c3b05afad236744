"""Benchmark jaxllama next to llama.cpp; the same as `jaxllama bench` (see jaxllama/benchmark.py).

    .venv/bin/python tools/bench.py [--model PATH] [--repeats 5] [--threads N] [--only decode,prefill]
"""

import sys

from jaxllama.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
