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


def bench_sensitivity(path: Path, types: str = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K", ctx: int = 512, chunks: int = 8) -> dict[str, Any]:
    """The issue's sweep: layer groups x 5 K-quant types on `chunks * ctx` tokens (4,096) of a
    licence text, on an off-grid F32 base made from `path` (cached next to the models). Reports the
    wall time, its parts, and the floating-point work the candidates need (each resumes at its
    layer: the layers from there on, and the head at the scored positions)."""
    import time

    from ..gguf.default_model import cache_dir
    from ..loader import load
    from ..quant.sensitivity import sensitivity
    from ..reference.export import export_offgrid
    from .sections import _score_text

    base = cache_dir() / f"{Path(path).stem}.offgrid-F32.gguf"
    if not base.exists():
        export_offgrid(path, base)
    model = load(base, weights="float32")
    c = model.config
    t0 = time.perf_counter()
    r = sensitivity(model, _score_text(), types.split(","), "layer", ctx=ctx, chunks=chunks)
    wall = time.perf_counter() - t0
    per_layer = 2 * sum(int(np.prod(s)) for n, s in _layer_shapes(model).items())  # flops per token per layer
    head = 2 * c.vocab_size * c.d_model
    tokens, scored = chunks * ctx, r.positions
    flops = sum((c.n_layer - (int(x.group.split(".")[1]) if x.group.startswith("blk.") else 0)) * per_layer * tokens
                + head * scored for x in r.cells)
    return {"base": str(base), "group": "layer", "types": r.types, "tokens": tokens, "cells": len(r.cells),
            "wall_s": round(wall, 1), "parts_s": r.timings, "candidate_gflop": round(flops / 1e9),
            "candidate_gflop_s": round(flops / 1e9 / max(r.timings["candidates_s"], 1e-9), 1),
            "rank_correlation": round(r.rank_correlation, 3)}


def _layer_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    from ..quant.sensitivity import quantizable

    return {n: s for n, s in quantizable(model).items() if n.startswith("blk.0.")}
