"""Rows to score, packed into length buckets of a fixed batch size, each bucket compiled once.

A `Row` is one forward input (`tokens`) and the positions whose next-token predictions are scored
(`at`, with `targets`). Rows are sorted by length and grouped by bucket: the width W (input length)
and the count N of scored positions are each rounded up to a power of two (at least `MIN_BUCKET`,
at most the model's context), so a handful of shapes covers any request mix. Every batch has
exactly `batch_size` rows; missing rows are dummies. Padding is right padding with a `valid` mask,
which the forward treats as absent (positions count only valid tokens, padded keys are never
attended to), so a row's numbers do not depend on its bucket or batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..parallel.placement import put_rows
from .kernels import compiled

MIN_BUCKET = 16


@dataclass(frozen=True)
class Row:
    """One forward input and the positions scored in it (`targets[i]` follows position `at[i]`)."""

    tokens: np.ndarray
    at: np.ndarray
    targets: np.ndarray


@dataclass
class Batch:
    """`batch_size` padded rows: `rows[i]` is the caller's index of row i (-1 for a dummy row)."""

    rows: list[int]
    tokens: np.ndarray  # [B, W] int32
    valid: np.ndarray  # [B, W] bool
    at: np.ndarray  # [B, N] int32
    targets: np.ndarray  # [B, N] int32


@dataclass
class RunStats:
    """What a scoring call did: compilations (new programs), timings, real and padded tokens."""

    compilations: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0
    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (B, W, N) per bucket

    def as_dict(self) -> dict[str, Any]:
        return {"compilations": self.compilations, "compile_s": self.compile_s, "run_s": self.run_s,
                "batches": self.batches, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "buckets": [list(s) for s in self.shapes]}


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
    return min(limit, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidInputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def plan(rows: Sequence[Row], batch_size: int, limit: int, width: int | None = None) -> list[Batch]:
    """Sort rows by length and pack them into padded batches of `batch_size` rows per bucket.

    `width` fixes W for every row (perplexity chunks all have the context's length).
    """
    batch_size = check_batch_size(batch_size)

    def key(i: int) -> tuple[int, int]:
        w = width or bucket(len(rows[i].tokens), limit)
        return w, min(w, bucket(len(rows[i].at), limit))

    order = sorted(range(len(rows)), key=lambda i: (key(i), len(rows[i].tokens)))
    batches = []
    start = 0
    while start < len(order):
        w, n = key(order[start])
        stop = start
        while stop < len(order) and stop - start < batch_size and key(order[stop]) == (w, n):
            stop += 1
        members = order[start:stop]
        tokens = np.zeros((batch_size, w), np.int32)
        valid = np.zeros((batch_size, w), bool)
        valid[:, 0] = True  # dummy rows: one token, so no query is left without a key
        at = np.zeros((batch_size, n), np.int32)
        targets = np.zeros((batch_size, n), np.int32)
        for j, i in enumerate(members):
            r = rows[i]
            tokens[j, : len(r.tokens)], valid[j, : len(r.tokens)] = r.tokens, True
            at[j, : len(r.at)], targets[j, : len(r.at)] = r.at, r.targets
        batches.append(Batch(members + [-1] * (batch_size - len(members)), tokens, valid, at, targets))
        start = stop
    return batches


def run(model: Any, batches: Sequence[Batch], fn: Callable, stats: RunStats, extra: Callable | None = None,
        **statics: Any) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """Run the kernel `fn` (see `kernels`) over the batches; yield each batch with its device outputs.

    `extra(batch)` may supply more arguments (KL's base log-probs). Compilation happens ahead of
    time on a bucket's first batch and is timed apart from the runs. On a model with a mesh, the
    rows are split over "data" (padded to a multiple of its size: outputs may hold extra rows
    after the batch's own, which callers never read).
    """
    mesh = getattr(model, "mesh", None)
    statics = {"config": model.config, "act_quant": model.act_quant, **statics}
    for b in batches:
        args = (model.params, *put_rows(mesh, b.tokens, b.valid, b.at, b.targets))
        if extra is not None:
            args += put_rows(mesh, *extra(b))
        exe, spent = compiled(fn, statics, *args)
        if spent:
            stats.compilations += 1
            stats.compile_s += spent
            stats.shapes.append((b.tokens.shape[0], b.tokens.shape[1], b.at.shape[1]))
        t = time.perf_counter()
        out = exe(*args)
        out = {k: v.block_until_ready() for k, v in out.items()}
        stats.run_s += time.perf_counter() - t
        stats.batches += 1
        stats.tokens += int(b.valid[np.asarray(b.rows) >= 0].sum())
        stats.padded_tokens += b.tokens.size
        yield b, out
