"""`jaxllama bench --only quant`: the quantizers' throughput, ours (numpy) next to llama.cpp's
(`ggml_quantize_chunk`, one thread), on a real matrix of the model taken off its grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import timed


def bench_quant(path: Path, repeats: int) -> dict[str, Any]:
    import gguf

    from ..quant import QUANT_TYPES, quantize
    from ..reference.quantize import ggml_quantize

    r = gguf.GGUFReader(path)
    # the largest layer matrix whose rows fill 256-value blocks (the K-quants' shape)
    t = max((t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2 and int(t.shape[0]) % 256 == 0),
            key=lambda t: int(np.prod(t.shape)))
    x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0])).astype(np.float32)
    x = x[: max(1, (1 << 21) // x.shape[1])]  # about 2M values (8 MB)
    rng = np.random.default_rng(0)
    x = x + np.float32(0.05) * x.std() * rng.standard_normal(x.shape).astype(np.float32)  # off the file's grid
    qw = rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32)
    mb = x.nbytes / 1e6
    out: dict[str, Any] = {"tensor": t.name, "shape": list(x.shape), "input_mb": round(mb, 1),
                           "units": "MB/s of float32 input; llama.cpp: ggml_quantize_chunk on one thread"}
    for name in QUANT_TYPES:
        for label, w in (("", None), ("+imatrix", qw)):
            ours, _ = timed(lambda: quantize(x, name, w), repeats)
            theirs, _ = timed(lambda: ggml_quantize(x, gguf.GGMLQuantizationType[name], w), repeats)
            out[name + label] = {"jaxllama_mb_s": round(mb / ours, 1), "llama_cpp_mb_s": round(mb / theirs, 1),
                                 "ratio": round(theirs / ours, 2)}
    return out
