"""Benchmark jaxllama next to llama.cpp; the same as `jaxllama bench` (see jaxllama/bench/sections.py).

    .venv/bin/python tools/bench.py [--model PATH] [--repeats 5] [--threads N] [--only decode,prefill]
"""

import sys

from jaxllama.bench import main

if __name__ == "__main__":
    sys.exit(main())
