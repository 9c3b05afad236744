"""Checks of a GGUF's tensor data that are cheap enough to run on every conversion.

Non-finite weights (a NaN or Inf float16 block scale, an F16 weight that overflowed when the file
was written) make every logit NaN or garbage, silently: `generate` printed `!!!!`. They are found
once, when a file is converted (a kept conversion was checked when it was made), by reading only
the float fields of each block (one strided view per field, vectorised).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .reader import GGUFFile

#: Byte offsets of the float16 fields in one block of each quantized type (ggml-common.h).
FLOAT16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}
WHOLE = {T.F32: np.float32, T.F16: np.float16}


def nonfinite_tensors(f: GGUFFile) -> list[str]:
    """Names of the tensors holding a NaN or Inf: in a block's float16 scale or minimum, or
    anywhere in an F32/F16 tensor (BF16 and the other types are read as they come)."""
    bad = []
    for name, info in f.tensors.items():
        raw = f.data[info.offset: info.offset + info.nbytes]
        if info.ggml_type in WHOLE:
            values = raw.view(WHOLE[info.ggml_type])
        elif info.ggml_type in FLOAT16_FIELDS:
            blocks = raw.reshape(-1, GGML_QUANT_SIZES[info.ggml_type][1])
            values = np.stack([blocks[:, o: o + 2].copy().view(np.float16)[:, 0] for o in FLOAT16_FIELDS[info.ggml_type]])
        else:
            continue
        if not np.isfinite(values).all():
            bad.append(name)
    return bad
