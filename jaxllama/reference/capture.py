"""Capture llama.cpp's intermediate tensors through its eval callback (`cb_eval`).

The callback answers "yes" to every ask, then copies each finished tensor out with
`ggml_backend_tensor_get` (from libggml-base, via ctypes), using the tensor's strides. A name
that appears several times (Qcur before and after RoPE) keeps its last value. All tokens go
in one batch with logits requested for every position, so the last layer computes all rows.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .llamacpp import LlamaCpp


class _TensorHead(ctypes.Structure):
    """The leading fields of `struct ggml_tensor`."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


#: GGML tensor types we read, and the numpy dtype of their elements.
GGML_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # GGML_TYPE_F32, F16, I32


def _ggml_base(llama_cpp_dir: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(llama_cpp_dir / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def read_tensor(lib: ctypes.CDLL, t: int) -> np.ndarray | str:
    """A finished ggml tensor as a float32 4-D array in numpy order (ggml's `ne` reversed, strides
    respected), or the name of its GGML type when it is not one of `GGML_DTYPES`."""
    head = _TensorHead.from_address(t)
    dtype = GGML_DTYPES.get(head.type)
    if dtype is None:
        return f"ggml type {head.type}"
    size = lib.ggml_nbytes(t)
    buf = np.empty(size, np.uint8)
    lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
    shape = tuple(int(head.ne[i]) for i in range(3, -1, -1))
    strides = tuple(int(head.nb[i]) for i in range(3, -1, -1))
    pad = (-size) % np.dtype(dtype).itemsize  # a strided view may end mid-element
    data = np.concatenate([buf, np.zeros(pad, np.uint8)]).view(dtype)
    return np.array(np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides), dtype=np.float32)


def capture(
    path: str | os.PathLike,
    tokens: Sequence[int],
    keep: Callable[[str], bool] = lambda name: True,
    n_threads: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str]]:
    """Run `tokens` through llama.cpp (F32 KV cache, flash attention off).

    Returns `(tensors, logits, unreadable)`: tensors by llama.cpp name (e.g. "attn_norm-3") as
    4-D float32 arrays in numpy order (the token axis is the outermost one larger than 1, so
    `a.reshape(T, -1)` gives one row per token), for names where `keep(name)` is true; logits
    `[T, vocab]`; and the kept names whose type could not be read, with that type (a caller must
    not treat those as agreeing).
    """
    tensors: dict[str, np.ndarray] = {}
    unreadable: dict[str, str] = {}
    lib: list[ctypes.CDLL] = []

    def on_tensor(t: int) -> None:
        name = lib[0].ggml_get_name(t).decode("utf-8", "replace")
        if keep(name):
            value = read_tensor(lib[0], t)
            if isinstance(value, str):
                unreadable[name] = value
            else:
                tensors[name] = value
                unreadable.pop(name, None)

    n = len(tokens)
    with LlamaCpp(path, n_ctx=max(n, 16), n_threads=n_threads, on_tensor=on_tensor) as ref:
        lib.append(_ggml_base(Path(ref.lib.__file__).parent))
        logits = ref.logits(tokens)
    return tensors, logits, unreadable
