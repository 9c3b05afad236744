"""llama.cpp's importance matrix, for parity tests: what llama-imatrix's `collect_imatrix` adds up,
taken from the eval callback. For every `MUL_MAT` whose weight is a layer matrix (`blk.*`; and
`output.weight` with `process_output`) and whose input has at least 16 rows, each input row's
squares are added to the matrix's float32 sums, one row after another, and the rows counted.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from .capture import _TensorHead, _ggml_base, read_tensor
from .llamacpp import LlamaCpp


class _TensorOp(ctypes.Structure):
    """`struct ggml_tensor` up to its sources (ggml.h: op, 64 bytes of op_params, flags, src[10])."""

    _fields_ = [*_TensorHead._fields_, ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10)]


def llamacpp_imatrix(path: str | os.PathLike, chunks: np.ndarray, process_output: bool = False,
                     n_threads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(float32 sums of squared inputs per matrix, token counts) over token chunks `[n, n_ctx]`,
    each chunk a fresh sequence in one batch, as llama-imatrix runs them."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    lib: list[ctypes.CDLL] = []

    def on_tensor(t: int) -> None:
        head = _TensorOp.from_address(t)
        if lib[0].ggml_op_name(head.op) != b"MUL_MAT":
            return
        w, x = head.src[0], head.src[1]
        name = lib[0].ggml_get_name(w).decode()
        if not (name.startswith("blk.") or (process_output and name == "output.weight")):
            return
        xs = _TensorHead.from_address(x)
        if xs.ne[1] < 16 or xs.type != 0:  # llama-imatrix skips small batches and non-F32 inputs
            return
        rows = read_tensor(lib[0], x).reshape(-1, xs.ne[0])
        acc = sums.setdefault(name, np.zeros(xs.ne[0], np.float32))
        for r in rows:  # float32, row by row, as collect_imatrix adds them
            acc += r * r
        counts[name] = counts.get(name, 0) + rows.shape[0]

    n_ctx = int(chunks.shape[1])
    with LlamaCpp(path, n_ctx=n_ctx, n_threads=n_threads, on_tensor=on_tensor) as ref:
        base = _ggml_base(Path(ref.lib.__file__).parent)
        base.ggml_op_name.restype = ctypes.c_char_p
        base.ggml_op_name.argtypes = [ctypes.c_int]
        lib.append(base)
        for chunk in chunks:
            ref.clear()
            ref.eval([int(t) for t in chunk], all_logits=True)
    return sums, counts
