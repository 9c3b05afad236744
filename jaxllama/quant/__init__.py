"""Quantization to GGML types with llama.cpp's own arithmetic: the same bytes as
`llama-quantize`, from float32 arrays, with or without an importance matrix.

    from jaxllama.quant import quantize
    blocks = quantize(w, "Q4_K", imatrix=None)   # uint8 [rows, row_bytes], as in a GGUF file

Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_NL. Vectorised numpy
(`search.py`: the scale searches; `types.py`: layouts), in chunks of rows; the legacy types
without an importance matrix are gguf-py's ports, which tests hold to the same bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import InvalidInputError
from .types import quantize_rows

T = GGMLQuantizationType
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
CHUNK_VALUES = 1 << 18  # values per numpy pass: the working set stays in cache


def parse_type(name: str | GGMLQuantizationType, what: str = "type") -> GGMLQuantizationType:
    """'q4_k' / 'Q4_K' / GGMLQuantizationType.Q4_K -> the type, or an InvalidInputError naming the choices."""
    key = name.name if isinstance(name, GGMLQuantizationType) else str(name).strip().upper()
    if key not in QUANT_TYPES:
        raise InvalidInputError(f"{what} {name!r}: not a type jaxllama quantizes to (choose from {', '.join(QUANT_TYPES)})")
    return T[key]


def quantize(x: np.ndarray, qtype: str | GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 values `[rows, n]` (or one row `[n]`) -> GGML blocks `uint8 [rows, row_bytes]`,
    byte for byte what llama.cpp's `ggml_quantize_chunk` writes. `imatrix` holds one importance per
    column (llama.cpp's per-input-channel sums of squared activations)."""
    t = parse_type(qtype)
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise InvalidInputError(f"quantize: expected float rows [rows, n], got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x, np.float32)
    block = GGML_QUANT_SIZES[t][0]
    if x.shape[1] % block:
        raise InvalidInputError(f"quantize: rows of {x.shape[1]} values cannot be {t.name} (blocks of {block})")
    if not np.isfinite(x).all():
        raise InvalidInputError("quantize: the values contain NaN or Inf")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, np.float32).reshape(-1)
        if qw.size != x.shape[1]:
            raise InvalidInputError(f"quantize: the importance matrix has {qw.size} values for rows of {x.shape[1]}")
        if not (np.isfinite(qw).all() and (qw >= 0).all()):
            raise InvalidInputError("quantize: the importance matrix must be finite and non-negative")
    step = max(1, CHUNK_VALUES // x.shape[1])
    return np.concatenate([quantize_rows(x[i:i + step], t, qw) for i in range(0, x.shape[0], step)])


__all__ = ["QUANT_TYPES", "parse_type", "quantize"]
