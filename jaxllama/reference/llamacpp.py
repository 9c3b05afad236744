"""One llama.cpp context (low-level llama-cpp-python API) for logits, greedy decoding and tensors.

Defaults are the bit-close settings: float32 KV cache, flash attention off, logits for every
position. With `on_tensor`, llama.cpp's eval callback (`cb_eval`) hands over every intermediate
tensor as it is computed (see `capture`). On a quantized file llama.cpp quantizes activations
too (Q8_1 for Q4_1 weights), so only agreement in distribution is expected there.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .binding import ReferenceUnavailableError, load_llama_cpp

GGML_TYPE_F32 = 0
FLASH_ATTN_DISABLED = 0


def default_threads() -> int:
    """llama.cpp's threads when not given: `JAXLLAMA_REFERENCE_THREADS`, else every core. (ggml's
    threads meet at spinning barriers: when other processes share the cores, as parallel test
    workers do, one thread each keeps a descheduled thread from stalling every graph node.)"""
    return int(os.environ.get("JAXLLAMA_REFERENCE_THREADS") or 0) or os.cpu_count() or 1


class LlamaCpp:
    """A llama.cpp model and context: `n_ctx` slots, `n_seq` sequences, `n_threads` threads.

    `on_tensor(tensor_pointer) -> None` receives each computed tensor (the eval callback).
    `bit_close=False` keeps llama.cpp's own defaults instead (F16 KV cache, flash attention
    auto): its usual speed, not the bit-close numbers.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None,
                 n_seq: int = 1, on_tensor: Callable[[int], None] | None = None, bit_close: bool = True):
        self.lib = lib = load_llama_cpp(path)
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self._model:
            raise ReferenceUnavailableError(f"llama.cpp could not load {path}")
        self.vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max = n_seq
        if bit_close:
            cp.type_k = cp.type_v = GGML_TYPE_F32
            cp.flash_attn_type = FLASH_ATTN_DISABLED
        cp.n_threads = cp.n_threads_batch = n_threads or default_threads()
        self._callback = None
        if on_tensor is not None:
            def eval_cb(tensor: int, ask: bool, _user: Any) -> bool:
                if not ask:
                    on_tensor(tensor)
                return True  # ask: yes, every tensor; done: keep going

            self._callback = lib.ggml_backend_sched_eval_callback(eval_cb)  # kept alive with self
            cp.cb_eval = self._callback
            cp.cb_eval_user_data = None
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise ReferenceUnavailableError(f"llama.cpp could not create a context of {n_ctx} for {path}")
        self._batch = lib.llama_batch_init(n_ctx, 0, n_seq)
        self.n_tokens = 0  # tokens in sequence 0's cache (the single-sequence helpers)

    def set_control_vector(self, n_embd: int, data: np.ndarray | None, start: int, end: int) -> None:
        """`llama_set_adapter_cvec`: `data` (layer 1's vector first, as `control_vector.
        llamacpp_control_vectors` builds it) added to layers `start..end`; None removes it."""
        buf = None if data is None else np.ascontiguousarray(data, np.float32)
        ptr = None if buf is None else buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        err = self.lib.llama_set_adapter_cvec(self._ctx, ptr, 0 if buf is None else buf.size, n_embd, start, end)
        if err:
            raise ReferenceUnavailableError(f"llama.cpp refused the control vector (n_embd {n_embd}): error {err}")

    # --- text ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 16
        buf = (self.lib.llama_token * size)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        return list(buf[:n])

    # --- decoding --------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the KV cache of every sequence."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self._ctx), True)
        self.n_tokens = 0

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
               want: Sequence[bool]) -> None:
        """One `llama_decode` call of a batch of (token, position, sequence, want logits) entries."""
        b = self._batch
        if len(tokens) > self.n_ctx:
            raise ValueError(f"a batch of {len(tokens)} entries exceeds n_ctx {self.n_ctx}")
        for i, (tok, pos, seq, out) in enumerate(zip(tokens, positions, seqs, want)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(tok), int(pos), 1, bool(out)
            b.seq_id[i][0] = int(seq)
        b.n_tokens = len(tokens)
        if self.lib.llama_decode(self._ctx, b) != 0:
            raise ReferenceUnavailableError("llama.cpp: llama_decode failed")

    def output_logits(self, i: int) -> np.ndarray:
        """float32 logits `[vocab]` of batch entry i of the last decode (-1: the last); the entry
        must have asked for logits."""
        ptr = self.lib.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to sequence 0; logits of the last token `[vocab]`, or of all `[T, vocab]`."""
        n = len(tokens)
        if self.n_tokens + n > self.n_ctx:
            raise ValueError(f"{self.n_tokens} + {n} tokens exceed n_ctx {self.n_ctx}")
        want = [all_logits or i == n - 1 for i in range(n)]
        self.decode(tokens, range(self.n_tokens, self.n_tokens + n), [0] * n, want)
        self.n_tokens += n
        if not all_logits:
            return self.output_logits(-1)
        ptr = self.lib.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 `[T, vocab]` logits of `tokens` from an empty cache, in one batch."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise ValueError(f"need 1..{self.n_ctx} tokens, got {len(tokens)}")
        self.clear()
        return self.eval(tokens, all_logits=True)

    def greedy(self, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
        """llama.cpp's greedy continuation: argmax of its logits, one cached decode step per token."""
        self.clear()
        logits = self.eval(prompt)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok in stop:
                break
            logits = self.eval([tok])
        return out

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self.lib.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
