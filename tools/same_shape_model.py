"""Write a random GGUF with the default model's shapes and types (SmolLM2-135M: 30 layers, d 576,
Q4_1 matrices, Q8_0 tied embedding), for speed measurements where the real file cannot travel."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import T, TinySpec, write_tiny_gguf  # noqa: E402

SPEC = TinySpec(n_layer=30, d_model=576, n_head=9, n_head_kv=3, d_ff=1536, vocab=49152, context=8192,
                rope_base=100000.0, tied=True, matrix_type=T.Q4_1, embd_type=T.Q8_0)

if __name__ == "__main__":
    t = time.perf_counter()
    out = write_tiny_gguf(sys.argv[1], SPEC, seed=0)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
