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


def llamacpp_read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An imatrix GGUF read as `common_imatrix_load` and llama-quantize's `load_imatrix` read it,
    on ggml's own GGUF reader: the metadata keys must be there (else llama-quantize exits), every
    `NAME.in_sum2` needs an F32 `NAME.counts`; the result is in_sum2 / round(count) in float32
    (1 where the count is 0), per matrix name."""
    from .binding import ReferenceUnavailableError
    from .control_vector import _GGUFInitParams, _ggml

    lib = _ggml()
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ctx)))
    if not g:
        raise ReferenceUnavailableError(f"{path}: ggml could not read the imatrix file as GGUF")
    try:
        for key in (b"imatrix.datasets", b"imatrix.chunk_count", b"imatrix.chunk_size"):
            if lib.gguf_find_key(g, key) < 0:
                raise ReferenceUnavailableError(f"{path}: llama-quantize: missing imatrix metadata {key.decode()}")
        names = [lib.gguf_get_tensor_name(g, i).decode() for i in range(lib.gguf_get_n_tensors(g))]
        out = {}
        for n in names:
            if not n.endswith(".in_sum2"):
                continue
            base = n[: -len(".in_sum2")]
            if base + ".counts" not in names:
                raise ReferenceUnavailableError(f"{path}: mismatched sums and counts for {base}")
            ts, tc = lib.ggml_get_tensor(ctx, n.encode()), lib.ggml_get_tensor(ctx, (base + ".counts").encode())
            if _TensorHead.from_address(ts).type != 0 or _TensorHead.from_address(tc).type != 0:
                raise ReferenceUnavailableError(f"{path}: sums and counts for {base} must be F32")
            sums = np.ctypeslib.as_array(lib.ggml_get_data_f32(ts), shape=(lib.ggml_nelements(ts),)).copy()
            counts = np.ctypeslib.as_array(lib.ggml_get_data_f32(tc), shape=(lib.ggml_nelements(tc),)).copy()
            ne0 = sums.size // counts.size
            e = np.ones_like(sums)
            for j, c in enumerate(np.rint(counts)):  # std::lround, then (float)
                if c > 0:
                    e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / np.float32(c)
            out[base] = e
        return out
    finally:
        lib.gguf_free(g)
        if ctx:
            lib.ggml_free(ctx)
