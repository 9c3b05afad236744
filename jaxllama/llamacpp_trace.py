"""Capture llama.cpp's intermediate tensors through its eval callback (`cb_eval`).

The context is built with the low-level llama-cpp-python API so that `cb_eval` can be set;
the callback answers "yes" to every ask, then copies each finished tensor out with
`ggml_backend_tensor_get` (from libggml-base, via ctypes), using the tensor's strides. A name
that appears several times (Qcur before and after RoPE) keeps its last value. All tokens go
in one batch with logits requested for every position, so the last layer computes all rows.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .llamacpp import ReferenceUnavailableError
from .llamacpp import _llama_cpp


class _TensorHead(ctypes.Structure):
    """The leading fields of `struct ggml_tensor`."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


_GGML_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # GGML_TYPE_F32, F16, I32


def _ggml_base(llama_cpp) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def capture(
    path: str | os.PathLike,
    tokens: Sequence[int],
    keep: Callable[[str], bool] = lambda name: True,
    n_threads: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run `tokens` through llama.cpp (F32 KV cache, flash attention off).

    Returns `(tensors, logits)`: tensors by llama.cpp name (e.g. "attn_norm-3") as 4-D float32
    arrays in numpy order (ggml's `ne` reversed; the token axis is the outermost one larger than
    1, so `a.reshape(T, -1)` gives one row per token), for names where `keep(name)` is true;
    logits `[T, vocab]`.
    """
    llama_cpp = _llama_cpp()
    lib = _ggml_base(llama_cpp)
    n = len(tokens)
    tensors: dict[str, np.ndarray] = {}

    def on_tensor(t: int, ask: bool, _user: int) -> bool:
        if ask:
            return True
        name = lib.ggml_get_name(t).decode("utf-8", "replace")
        if not keep(name):
            return True
        head = _TensorHead.from_address(t)
        dtype = _GGML_DTYPES.get(head.type)
        if dtype is None:
            return True
        size = lib.ggml_nbytes(t)
        buf = np.empty(size, np.uint8)
        lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
        shape = tuple(int(head.ne[i]) for i in range(3, -1, -1))
        strides = tuple(int(head.nb[i]) for i in range(3, -1, -1))
        pad = (-size) % np.dtype(dtype).itemsize  # a strided view may end mid-element
        data = np.concatenate([buf, np.zeros(pad, np.uint8)]).view(dtype)
        arr = np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides)
        tensors[name] = np.array(arr, dtype=np.float32)  # 4-D, numpy order
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ReferenceUnavailableError(f"llama.cpp could not load {path}")
    ctx = None
    batch = None
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max(n, 16)
        cparams.n_batch = cparams.n_ubatch = max(n, 16)
        cparams.type_k = cparams.type_v = 0  # F32 KV cache
        cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count()
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ReferenceUnavailableError("llama.cpp could not create a context")
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        for i, tok in enumerate(tokens):
            batch.token[i] = int(tok)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise ReferenceUnavailableError("llama.cpp: llama_decode failed")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n * vocab,))
        logits = logits.reshape(n, vocab).copy()
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    del callback
    return tensors, logits
