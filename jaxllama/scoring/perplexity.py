"""Perplexity exactly as llama.cpp's `llama-perplexity` computes it (tools/perplexity/perplexity.cpp).

- Tokenize the whole text with `add_special` (BOS if the model adds one), no special-token parsing.
- Refuse fewer than `2 * ctx` tokens (llama-perplexity's own rule); use `len // ctx` chunks of `ctx`
  tokens (or the first `chunks` of them); the rest of the text is not scored.
- Each chunk runs on an empty cache; its first token is replaced by BOS when the model adds BOS.
- Score positions `ctx/2 .. ctx-2` of each chunk: each predicts the next token of the text.
- NLL summed in float64; `ppl = exp(mean)`, and its standard error as llama.cpp estimates it:
  `ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1))`.

Many chunks go through one batched forward (`batch_size` chunks, one compiled program).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..parallel.distributed import check_same_work, gather_rows, share
from ..parallel.placement import padded_rows
from .buckets import Batch, Row, RunStats, check_batch_size, plan, run
from .kernels import score_rows

Progress = Callable[[int, int, float], None]  # (chunks done, chunks in all, running ppl)
BATCH_TOKENS = 2048  # llama-perplexity's n_batch: its chunks per decode (the llama.cpp side)
# Our default chunks per forward: about this many tokens. Measured on a 2-core Xeon (ctx 512,
# float32): 1 chunk per forward scored 315 tok/s, 2 chunks 212, 4 chunks 145 (activations of
# 2,048 rows no longer fit the caches); at ctx 128, 4 chunks (512 tokens) were fastest.
FORWARD_TOKENS = 512


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, or a one-line `InvalidInputError`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{p}: is a directory, not a text file") from None
    except OSError as e:
        raise InvalidInputError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None


def check_ctx(ctx: Any, context_length: int) -> int:
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or not 4 <= ctx <= context_length:
        raise InvalidInputError(f"ctx must be an integer in [4, {context_length}] (the model's context), got {ctx!r}")
    return int(ctx)


def text_tokens(model: Any, text: str | Sequence[int] | np.ndarray) -> list[int]:
    """The ids llama-perplexity scores: the text tokenized with add_special, or the given ids."""
    if isinstance(text, str):
        if not text.strip():
            raise InvalidInputError("empty text")
        return model.tokenizer.encode(text, add_special=True, parse_special=False)
    arr = np.asarray(text)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError("tokens: expected a non-empty list of integer token ids")
    bad = np.flatnonzero((arr < 0) | (arr >= model.config.vocab_size))
    if bad.size:
        raise InvalidInputError(f"tokens: token id {arr[bad[0]]} at index {bad[0]} is outside [0, {model.config.vocab_size})")
    return arr.astype(int).tolist()


def chunk_rows(tokens: Sequence[int], ctx: int, chunks: int | None, bos: int | None) -> list[Row]:
    """llama-perplexity's chunks as rows: `ctx` tokens (first one BOS if given), scored from ctx/2."""
    if len(tokens) < 2 * ctx:
        raise InvalidInputError(f"the text has {len(tokens)} tokens; perplexity with ctx {ctx} needs at least "
                                f"{2 * ctx} (two chunks, as llama-perplexity requires)")
    n_chunk = len(tokens) // ctx
    if chunks is not None:
        if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
            raise InvalidInputError(f"chunks must be an integer >= 1, got {chunks!r}")
        n_chunk = min(n_chunk, int(chunks))
    first = ctx // 2
    arr = np.asarray(tokens[: n_chunk * ctx], np.int32).reshape(n_chunk, ctx)
    at = np.arange(first, ctx - 1, dtype=np.int32)
    rows = []
    for chunk in arr:
        inp = chunk.copy()
        if bos is not None:
            inp[0] = bos
        rows.append(Row(inp, at, chunk[first + 1:]))
    return rows


def bos_for(model: Any) -> int | None:
    """The BOS id llama-perplexity puts at the start of every chunk, or None if the model adds no BOS."""
    tok = model.tokenizer
    return tok.bos_id if tok.add_bos else None


def default_batch(ctx: int, n_chunks: int, mesh: Any = None) -> int:
    """About `FORWARD_TOKENS` tokens of chunks, rounded up to a multiple of the mesh's data size."""
    return padded_rows(max(1, min(n_chunks, FORWARD_TOKENS // ctx)), mesh)


def plan_share(rows: Sequence[Row], mine: range, batch_size: int, limit: int, ctx: int) -> list[Batch]:
    """`plan` of this process's rows `mine`, with `Batch.rows` naming rows of the whole list."""
    batches = plan([rows[i] for i in mine], batch_size, limit, width=ctx)
    for b in batches:
        b.rows = [mine[i] if i >= 0 else -1 for i in b.rows]
    return batches


@dataclass
class Chunks:
    """llama-perplexity's chunks of a text (checked `ctx`), this process's share and the batch size."""

    ctx: int
    tokens: list[int]
    rows: list[Row]
    mine: range  # the rows this process scores (all of them in one process)
    batch_size: int

    @classmethod
    def of(cls, model: Any, text: str | Sequence[int], ctx: Any, chunks: int | None, batch_size: int | None) -> "Chunks":
        ctx = check_ctx(ctx, model.config.context_length)
        if batch_size is not None:
            check_batch_size(batch_size)
        tokens = text_tokens(model, text)
        rows = chunk_rows(tokens, ctx, chunks, bos_for(model))
        check_same_work(np.asarray(tokens[: len(rows) * ctx]), {  # every process: the same work, or all stop
            "ctx": ctx, "chunks": len(rows), "weights": getattr(model, "weights", None),
            "act_quant": getattr(model, "act_quant", None)})
        mine = share(len(rows))
        bs = batch_size or default_batch(ctx, max(1, len(mine)), getattr(model, "mesh", None))
        return cls(ctx, tokens, rows, mine, bs)


def ppl_and_err(nll: np.ndarray) -> tuple[float, float]:
    """`exp(mean nll)` and llama.cpp's standard error of it (float64 sums)."""
    v = np.asarray(nll, np.float64).ravel()
    n = v.size
    mean = v.sum() / n
    var = (v * v).sum() / n - mean * mean
    ppl = math.exp(mean)
    return ppl, (ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


@dataclass
class Perplexity:
    """A perplexity run: `nll [n_chunks, ctx/2 - 1]` per scored token, `ppl ± ppl_err`, timings."""

    ppl: float
    ppl_err: float
    nll: np.ndarray
    ctx: int
    n_chunks: int
    n_tokens: int  # tokens run through the model: n_chunks * ctx
    tok_s: float  # n_tokens per second of scoring, compilation excluded
    wall_s: float  # tokenizing, compiling and scoring
    compile_s: float
    batch_size: int
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON fields of `jaxllama perplexity --json` (without `reproduce`)."""
        return {"ppl": self.ppl, "ppl_err": self.ppl_err, "n_tokens": self.n_tokens, "n_chunks": self.n_chunks,
                "tok_s": round(self.tok_s, 2), "wall_s": round(self.wall_s, 3), "compile_s": round(self.compile_s, 3)}


def perplexity(model: Any, text: str | Sequence[int], ctx: int, chunks: int | None = None,
               batch_size: int | None = None, progress: Progress | None = None) -> Perplexity:
    """llama-perplexity's perplexity of `text` (or of token ids, taken as already tokenized) at `ctx`.

    `batch_size` chunks share one forward (default: about 512 tokens' worth); `progress` is
    called after each batch with (chunks done, chunks in all, running ppl). Under
    `jax.distributed` each process scores its share of the chunks (`parallel.share`) and the
    per-token NLLs are gathered, so every process returns the whole result (timings are its own).
    """
    t0 = time.perf_counter()
    c = Chunks.of(model, text, ctx, chunks, batch_size)
    ctx, rows, mine, bs = c.ctx, c.rows, c.mine, c.batch_size
    rs = RunStats()
    nll = np.zeros((len(rows), len(rows[0].at)), np.float64)
    done, total = 0, 0.0
    for b, out in run(model, plan_share(rows, mine, bs, model.config.context_length, ctx), score_rows, rs,
                      top_k=0, full=False):
        lp = np.asarray(out["logprob"])
        for j, i in enumerate(b.rows):
            if i >= 0:
                nll[i] = -lp[j, : nll.shape[1]].astype(np.float64)
                total += nll[i].sum()
                done += 1
        if progress is not None:
            progress(done, len(mine), math.exp(total / (done * nll.shape[1])))
    nll = gather_rows({"nll": nll})["nll"]
    ppl, err = ppl_and_err(nll)
    n_tokens = len(rows) * ctx
    return Perplexity(ppl, err, nll, ctx, len(rows), n_tokens, n_tokens / rs.run_s if rs.run_s else float("nan"),
                      time.perf_counter() - t0, rs.compile_s, bs, rs.as_dict())
