"""llama-perplexity's chunks scored by llama.cpp itself (the `jaxllama[llamacpp]` extra).

`LlamaCppChunks` decodes up to `n_seq` chunks per `llama_decode`, one sequence each on an empty
cache, asking logits only from position ctx/2 on, as llama-perplexity does with
`n_batch = n_seq * ctx`. It serves `llamacpp_perplexity` (llama.cpp's number, for comparison and
the benchmark) and `kl-divergence` with llama.cpp as the base run. The default is the bit-close
setting (F32 KV cache, flash attention off); `bit_close=False` keeps llama.cpp's defaults.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np

from .buckets import RunStats
from .perplexity import BATCH_TOKENS, Perplexity, Progress, check_ctx, chunk_rows, ppl_and_err

LOG_SOFTMAX_ROWS = 32  # positions of llama.cpp's logits taken to float64 at once (39 MB at a 152k vocabulary)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis in float64."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class LlamaCppChunks:
    """A llama.cpp context holding `n_seq` sequences of `ctx` tokens, for chunked scoring."""

    def __init__(self, path: str | os.PathLike, ctx: int, n_seq: int | None = None, n_threads: int | None = None,
                 bit_close: bool = True):
        from ..reference.llamacpp import LlamaCpp

        self.ctx = ctx
        self.n_seq = n_seq or max(1, BATCH_TOKENS // ctx)
        self.ref = LlamaCpp(path, n_ctx=self.n_seq * ctx, n_threads=n_threads, n_seq=self.n_seq, bit_close=bit_close)
        lib, vocab = self.ref.lib, self.ref.vocab
        self.bos = int(lib.llama_vocab_bos(vocab)) if lib.llama_vocab_get_add_bos(vocab) else None
        self.n_vocab = self.ref.n_vocab

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for the text, with add_special (as llama-perplexity tokenizes)."""
        return self.ref.tokenize(text, add_special=True, parse_special=False)

    def _decode(self, group: np.ndarray) -> None:
        """Run up to `n_seq` chunks `[b, ctx]`, one sequence each, asking logits from ctx/2 on."""
        first = self.ctx // 2
        self.ref.clear()
        toks, pos, seqs, want = [], [], [], []
        for s, chunk in enumerate(group):
            toks += [int(t) for t in chunk]
            pos += range(self.ctx)
            seqs += [s] * self.ctx
            want += [p >= first for p in range(self.ctx)]  # as llama-perplexity asks
        self.ref.decode(toks, pos, seqs, want)

    def _slabs(self, s: int) -> Iterator[tuple[int, np.ndarray]]:
        """`(p0, float64 log-softmax [n, vocab])` of sequence s of the last decode's scored positions
        p0..p0+n, `LOG_SOFTMAX_ROWS` at a time: no `[positions, vocab]` array of a whole chunk is
        held (1.2 GB at ctx 2,048 and a 152k vocabulary)."""
        first, n = self.ctx // 2, self.ctx - 1 - self.ctx // 2
        for p0 in range(0, n, LOG_SOFTMAX_ROWS):
            ks = range(p0, min(n, p0 + LOG_SOFTMAX_ROWS))
            yield p0, log_softmax64(np.stack([self.ref.output_logits(s * self.ctx + first + k) for k in ks]))

    def logprob_slabs(self, chunk: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Run one chunk `[ctx]` (first token already as it should be run) and yield its `_slabs`."""
        self._decode(chunk[None])
        yield from self._slabs(0)

    def nll(self, chunks: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Negative log-likelihoods `[b, ctx - 1 - ctx/2]` (float64) of `targets` at the scored
        positions of chunks `[b, ctx]`, `n_seq` chunks per decode."""
        out = np.empty(targets.shape, np.float64)
        for s0 in range(0, len(chunks), self.n_seq):
            group = chunks[s0: s0 + self.n_seq]
            self._decode(group)
            for s in range(len(group)):
                for p0, lp in self._slabs(s):
                    out[s0 + s, p0: p0 + len(lp)] = -lp[np.arange(len(lp)), targets[s0 + s, p0: p0 + len(lp)]]
        return out

    def close(self) -> None:
        self.ref.close()


def llamacpp_perplexity(path: str | os.PathLike, text: str | Sequence[int], ctx: int, chunks: int | None = None,
                        n_threads: int | None = None, n_seq: int | None = None, bit_close: bool = True,
                        progress: Progress | None = None) -> Perplexity:
    """llama-perplexity's perplexity computed by llama.cpp (its tokenizer, its logits, the float64 sums)."""
    t0 = time.perf_counter()
    from ..gguf.config import LlamaConfig
    from ..gguf.reader import read_gguf

    ctx = check_ctx(ctx, LlamaConfig.from_gguf(read_gguf(path)).context_length)
    lc = LlamaCppChunks(path, ctx, n_seq, n_threads, bit_close)
    try:
        tokens = lc.tokenize(text) if isinstance(text, str) else [int(t) for t in text]
        rows = chunk_rows(tokens, ctx, chunks, lc.bos)
        nll = np.zeros((len(rows), len(rows[0].at)), np.float64)
        t1 = time.perf_counter()
        for s0 in range(0, len(rows), lc.n_seq):
            group = rows[s0: s0 + lc.n_seq]
            nll[s0: s0 + len(group)] = lc.nll(np.stack([r.tokens for r in group]), np.stack([r.targets for r in group]))
            if progress is not None:
                done = s0 + len(group)
                progress(done, len(rows), math.exp(nll[:done].mean()))
        run_s = time.perf_counter() - t1
    finally:
        lc.close()
    ppl, err = ppl_and_err(nll)
    n_tokens = len(rows) * ctx
    stats: dict[str, Any] = RunStats(run_s=run_s, batches=-(-len(rows) // lc.n_seq), tokens=n_tokens).as_dict()
    return Perplexity(ppl, err, nll, ctx, len(rows), n_tokens, n_tokens / run_s, time.perf_counter() - t0, 0.0,
                      lc.n_seq, stats)
