"""llama.cpp's quantizers, for parity tests of `jaxllama.quant`.

`ggml_quantize(x, type, imatrix)` calls ggml's `ggml_quantize_chunk` (libggml-base, via ctypes):
the function `llama-quantize` runs on every tensor. `llama_quantize(...)` runs the whole tool
(`llama_model_quantize`) on a file, with an importance matrix given as per-tensor arrays as
llama-quantize hands them over (`llama_model_imatrix_data`).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    from .control_vector import _ggml as ggml_base

    lib = ggml_base()
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows `x[R, n]` (float32) -> llama.cpp's bytes `[R, row_bytes]`."""
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // block * size), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    done = _ggml().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                       None if qw is None else qw.ctypes.data)
    assert done == out.nbytes, (done, out.nbytes)
    return out


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: int, pure: bool = False,
                   imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 2) -> None:
    """`llama-quantize [--pure] [--imatrix] src dst ftype` through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = nthread
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, np.float32)
            name_b = name.encode()
            keep += [arr, name_b]
            entries[i].name = name_b
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")
