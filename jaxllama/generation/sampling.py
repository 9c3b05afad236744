"""Samplers as pure functions of (logits, PRNG key, settings), run on device with no host trip.

One `Sampler` (a frozen, hashable dataclass: a static jit argument) describes the chain. The
order is llama.cpp's default sampler chain (common/sampling: penalties, top-k, top-p, min-p,
temperature, then a draw): penalties see raw logits; the truncations act on the untempered
distribution, so temperature only reshapes what survives. Temperature 0 is greedy (argmax,
lowest id on ties).

Truncation details: top-k keeps every token whose logit is at least the k-th largest (ties at
the boundary are all kept); top-p keeps the smallest prefix of the sorted distribution whose
mass reaches p (the token that crosses p included); min-p keeps tokens with
p >= min_p * p_max. Penalties follow llama.cpp's: for a token seen c > 0 times in the last
`penalty_last_n` tokens (prompt included), a positive logit is divided by `repeat_penalty`, a
negative one multiplied, then `c * frequency_penalty + presence_penalty` is subtracted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import jax
import jax.numpy as jnp

from ..errors import InvalidInputError

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class Sampler:
    """Settings of the sampling chain. The defaults change nothing and sample at temperature 1."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {t}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidInputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0 or math.isinf(self.repeat_penalty):
            raise InvalidInputError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise InvalidInputError(f"{name} must be finite, got {v}")
        if not isinstance(self.penalty_last_n, int) or self.penalty_last_n < 0:
            raise InvalidInputError(f"penalty_last_n must be an integer >= 0, got {self.penalty_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.penalty_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    def to_dict(self) -> dict:
        return asdict(self)


def apply_penalties(logits: jax.Array, counts: jax.Array, s: Sampler) -> jax.Array:
    """Repetition, presence and frequency penalties; `counts[b, v]` = occurrences in the window."""
    seen = counts > 0
    rep = jnp.where(logits > 0, logits / s.repeat_penalty, logits * s.repeat_penalty)
    out = jnp.where(seen, rep, logits)
    return out - counts * s.frequency_penalty - seen * s.presence_penalty


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep = before < p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, NEG_INF)


def min_p_mask(logits: jax.Array, min_p: float) -> jax.Array:
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + jnp.log(min_p), logits, NEG_INF)


def filtered_logits(logits: jax.Array, s: Sampler, counts: jax.Array | None = None) -> jax.Array:
    """The chain up to the draw: the logits whose softmax is the distribution sampled from."""
    x = logits.astype(jnp.float32)
    if counts is not None and s.uses_penalties:
        x = apply_penalties(x, counts, s)
    if s.top_k > 0:
        x = top_k_mask(x, min(s.top_k, x.shape[-1]))
    if s.top_p < 1.0:
        x = top_p_mask(x, s.top_p)
    if s.min_p > 0.0:
        x = min_p_mask(x, s.min_p)
    if not s.greedy and s.temperature != 1.0:
        x = x / s.temperature
    return x


def sample(logits: jax.Array, keys: jax.Array, s: Sampler, counts: jax.Array | None = None) -> jax.Array:
    """Draw one token per row: logits `[B, V]`, one PRNG key per row `[B]` -> ids `[B]` (int32)."""
    if s.greedy:  # the truncations keep the largest logit and its ties: skip them (a vocabulary sort per step)
        penalties_only = replace(s, top_k=0, top_p=1.0, min_p=0.0)
        return jnp.argmax(filtered_logits(logits, penalties_only, counts), axis=-1).astype(jnp.int32)
    x = filtered_logits(logits, s, counts)
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
