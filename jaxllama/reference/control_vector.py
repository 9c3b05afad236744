"""llama.cpp's control-vector loading, for parity tests: files read by ggml's own GGUF reader.

`common_control_vector_load` (llama.cpp's `common/common.cpp`) is not in the library that
llama-cpp-python ships, so its steps are taken here in the same order on ggml's C API
(`gguf_init_from_file`, `ggml_get_tensor`): every tensor must be `direction.N`, N >= 1, F32 and
1-D, of one width; file k's directions times its strength are summed into a buffer whose first
row is layer 1. `LlamaCpp.set_control_vector` then hands that buffer to `llama_set_adapter_cvec`.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .binding import ReferenceUnavailableError

GGML_TYPE_F32 = 0


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    lib.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_n_dims.restype = ctypes.c_int
    lib.ggml_n_dims.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


def _load_one(lib: ctypes.CDLL, path: str | os.PathLike, strength: float) -> tuple[int, np.ndarray]:
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ctx)))
    if not g:
        raise ReferenceUnavailableError(f"{path}: ggml could not read the control vector file")
    try:
        n_embd, data = -1, np.zeros(0, np.float32)
        for i in range(lib.gguf_get_n_tensors(g)):
            name = lib.gguf_get_tensor_name(g, i)
            head, _, tail = name.decode().partition(".")
            layer = int(tail) if head == "direction" and tail.isdigit() else -1
            if layer <= 0:
                raise ReferenceUnavailableError(f"{path}: llama.cpp refuses tensor {name.decode()!r}")
            t = lib.ggml_get_tensor(ctx, name)
            if lib.gguf_get_tensor_type(g, i) != GGML_TYPE_F32 or lib.ggml_n_dims(t) != 1:
                raise ReferenceUnavailableError(f"{path}: llama.cpp refuses the non-F32 or non-1-D {name.decode()!r}")
            n = lib.ggml_nelements(t)
            if n_embd not in (-1, n):
                raise ReferenceUnavailableError(f"{path}: direction tensors of different widths")
            n_embd = n
            if data.size < n * layer:
                data = np.concatenate([data, np.zeros(n * layer - data.size, np.float32)])
            src = np.ctypeslib.as_array(lib.ggml_get_data_f32(t), shape=(n,))
            # llama.cpp: dst[j] += src[j] * strength, in float32
            data[n * (layer - 1): n * layer] += src * np.float32(strength)
        return n_embd, data
    finally:
        lib.gguf_free(g)
        if ctx:
            lib.ggml_free(ctx)


def llamacpp_control_vectors(files: Sequence[tuple[str | os.PathLike, float]]) -> tuple[int, np.ndarray]:
    """(n_embd, data) as `common_control_vector_load` builds them from (file, strength) pairs:
    `data` holds layer 1's vector first."""
    lib = _ggml()
    n_embd, total = -1, np.zeros(0, np.float32)
    for path, strength in files:
        n, data = _load_one(lib, path, strength)
        if n_embd not in (-1, n):
            raise ReferenceUnavailableError(f"{path}: control vectors of different widths")
        n_embd = n
        if total.size < data.size:
            total = np.concatenate([total, np.zeros(data.size - total.size, np.float32)])
        total[: data.size] += data
    return n_embd, total
