"""The jitted scoring programs: the forward's residual stream, the output layer a block of positions
at a time, and only the numbers scoring needs sent back to the host.

`score_rows` returns, at chosen positions `at [B, N]`, the log-probability of a target token, whether
the target is the argmax, optionally the top-k alternatives and optionally the whole log-softmax
(kept on the device, for KL). `kl_rows` compares a model's log-softmax with given base log-probs
position by position. Neither ever holds more than `HEAD_ROWS * HEAD_VOCAB` logits at once
(96 MiB), whatever the vocabulary.

Programs are compiled ahead of time per (settings, shapes) and cached; `compilations()` counts them.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..gguf.config import LlamaConfig
from ..gguf.convert import Params
from ..model import forward_hidden, head

HEAD_ROWS = 512  # (row, position) pairs per block of the output layer at a vocabulary of HEAD_VOCAB
HEAD_VOCAB = 49152  # larger vocabularies get proportionally fewer rows: a block's logits stay <= 96 MiB


def _head_blocks(params: Params, x: jax.Array, c: LlamaConfig, aq: tuple, fn: Callable, *extra: jax.Array) -> Any:
    """Apply the output layer to x `[B, N, D]` in blocks of positions and reduce each block with
    `fn(logits [B, n, V], *extra_blocks)`; outputs are stitched back to `[B, N, ...]`."""
    b, n = x.shape[:2]
    rows = max(1, HEAD_ROWS * HEAD_VOCAB // c.vocab_size)
    step = max(1, min(n, rows // b))
    nb = -(-n // step)
    pad = nb * step - n

    def split(a: jax.Array) -> jax.Array:  # [B, N, ...] -> [nb, B, step, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, nb, step, *a.shape[2:]).swapaxes(0, 1)

    p = params["params"]
    out = jax.lax.map(lambda xs: fn(head(p, xs[0], c, dict(aq)), *xs[1:]), tuple(split(a) for a in (x, *extra)))

    def join(a: jax.Array) -> jax.Array:  # [nb, B, step, ...] -> [B, N, ...]
        return a.swapaxes(0, 1).reshape(b, nb * step, *a.shape[3:])[:, :n]

    return jax.tree.map(join, out)


def _hidden_at(params: Params, tokens: jax.Array, valid: jax.Array, at: jax.Array, c: LlamaConfig,
               aq: tuple | None) -> jax.Array:
    """The final residual stream at positions `at [B, N]`: `[B, N, D]`."""
    x = forward_hidden(params, tokens, c, valid, aq)
    return jnp.take_along_axis(x, at[:, :, None], axis=1)


def score_rows(params: Params, tokens: jax.Array, valid: jax.Array, at: jax.Array, targets: jax.Array, *,
               config: LlamaConfig, act_quant: tuple | None, top_k: int, full: bool) -> dict[str, jax.Array]:
    """Per position `at[b, n]`: `logprob` of `targets[b, n]`, `greedy` (the target's logit is the
    largest), with `top_k` the `top_logprob`/`top_id` `[B, N, k]`, with `full` the log-softmax `[B, N, V]`."""

    def reduce(logits: jax.Array, tgt: jax.Array) -> dict[str, jax.Array]:
        lse = jax.nn.logsumexp(logits, axis=-1)
        t_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        out = {"logprob": t_logit - lse, "greedy": t_logit >= logits.max(axis=-1)}
        if top_k:
            vals, ids = jax.lax.top_k(logits, top_k)
            out |= {"top_logprob": vals - lse[..., None], "top_id": ids}
        if full:
            out["full"] = logits - lse[..., None]
        return out

    x = _hidden_at(params, tokens, valid, at, config, act_quant)
    return _head_blocks(params, x, config, act_quant or (), reduce, targets)


def kl_rows(params: Params, tokens: jax.Array, valid: jax.Array, at: jax.Array, targets: jax.Array,
            base: jax.Array, *, config: LlamaConfig, act_quant: tuple | None) -> dict[str, jax.Array]:
    """Per position, against base log-probs `base [B, N, V]`: see `kl_reduce`."""
    x = _hidden_at(params, tokens, valid, at, config, act_quant)
    return _head_blocks(params, x, config, act_quant or (), kl_reduce, targets, base)


def kl_reduce(logits: jax.Array, tgt: jax.Array, lp_base: jax.Array) -> dict[str, jax.Array]:
    """A block of logits against base log-probs: `kld` = KL(base || model) in nats, `nll` and
    `nll_base` of the target, `same_top` (both argmaxes agree)."""
    lp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    kld = jnp.sum(jnp.exp(lp_base) * (lp_base - lp), axis=-1)
    pick = lambda a: -jnp.take_along_axis(a, tgt[..., None], axis=-1)[..., 0]  # noqa: E731
    same = jnp.argmax(logits, axis=-1) == jnp.argmax(lp_base, axis=-1)
    return {"kld": kld, "nll": pick(lp), "nll_base": pick(lp_base), "same_top": same}


_COMPILED: dict[Any, Any] = {}
_TOTALS = {"compilations": 0, "compile_s": 0.0}


def compiled(fn: Callable, statics: dict[str, Any], *args: Any) -> tuple[Callable, float]:
    """`fn` compiled ahead of time for these static settings and argument shapes (cached).

    Returns the executable and the seconds spent compiling it now (0.0 when it was cached).
    """
    leaves, tree = jax.tree.flatten(args)
    key = (fn.__name__, tuple(sorted(statics.items())), tree, tuple((np.shape(a), jnp.result_type(a)) for a in leaves),
           tuple(getattr(a, "sharding", None) for a in leaves))  # a program is compiled for its inputs' shardings
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t = time.perf_counter()
    exe = jax.jit(partial(fn, **statics)).lower(*args).compile()
    spent = time.perf_counter() - t
    _COMPILED[key] = exe
    _TOTALS["compilations"] += 1
    _TOTALS["compile_s"] += spent
    return exe, spent


def compilations() -> int:
    """How many scoring programs this process has compiled (one per bucket shape and setting)."""
    return _TOTALS["compilations"]
