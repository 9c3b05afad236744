"""Write an off-grid base for quantization experiments: a GGUF's F32 re-export with seeded noise
of `--noise` (0.05) times each matrix's standard deviation added to every matrix llama-quantize
would quantize (norms and vectors untouched).

Why: the F32 re-export of a quantized file lies on that file's grid, so re-quantizing it to the
same type is lossless and a sensitivity sweep on it would crown that type for the wrong reason.

    python tools/offgrid_base.py --model smollm2-135m --out base.F32.gguf [--noise 0.05] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from jaxllama.cli.main import _model_path
    from jaxllama.reference.export import export_offgrid

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path or known model name (default: the default model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = export_offgrid(_model_path(a.model), Path(a.out), a.noise, a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
