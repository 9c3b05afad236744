"""The Llama forward pass as pure functions of (params, tokens, config).

Numerics follow llama.cpp's graph for GGUF `llama` weights: RMSNorm `x / sqrt(mean(x^2) + eps) * w`,
RoPE on adjacent pairs `(x[2i], x[2i+1])` with llama.cpp's theta recurrence, grouped-query
attention (query head h reads KV head h // n_group), SwiGLU `silu(gate) * up`, output tied to
the embedding when the file has no `output.weight`. Activations are float32 whatever the
weight dtype; matrix products use full float32 precision on every backend.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import LlamaConfig

Params = dict[str, Any]
MASKED = -1e30  # finite, so a row with no visible key gives uniform weights, not NaN


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` with float32 accumulation and full precision (no TF32 on GPUs)."""
    return jnp.einsum(
        "...i,io->...o",
        x.astype(kernel.dtype),
        kernel,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, as ggml_rms_norm followed by ggml_mul."""
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * lax.rsqrt(mean_sq + eps) * scale.astype(jnp.float32)


def rope_angles(positions: jax.Array, c: LlamaConfig, freq_factors: jax.Array | None) -> jax.Array:
    """Angles `[..., rope_dim // 2]` for integer `positions`, computed as ggml does.

    ggml starts from theta = position and multiplies by base^(-2/rope_dim) once per pair
    (a float32 recurrence, not a power per pair); `rope_freqs` divides each theta and
    linear scaling multiplies it by 1 / factor.
    """
    step = np.float32(np.float32(c.rope_base) ** np.float32(-2.0 / c.rope_dim))
    theta = positions.astype(jnp.float32)
    cols = []
    for _ in range(c.rope_dim // 2):
        cols.append(theta)
        theta = theta * step
    angles = jnp.stack(cols, axis=-1)
    if freq_factors is not None:
        angles = angles / freq_factors.astype(jnp.float32)
    if c.rope_scale != 1.0:
        angles = np.float32(1.0 / c.rope_scale) * angles
    return angles


def apply_rope(x: jax.Array, angles: jax.Array, rope_dim: int) -> jax.Array:
    """Rotate adjacent pairs of the first `rope_dim` dims of x `[B, T, heads, head_dim]`."""
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(rot.shape)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, c: LlamaConfig) -> jax.Array:
    """Grouped-query attention. q `[B, T, H, d]`, k/v `[B, S, K, d]`, mask `[B, T, S]` -> `[B, T, H*d]`."""
    b, t = q.shape[:2]
    q = q.reshape(b, t, c.n_head_kv, c.n_group, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, precision=lax.Precision.HIGHEST)
    scores = scores * np.float32(1.0 / np.sqrt(c.head_dim))
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=lax.Precision.HIGHEST)
    return out.reshape(b, t, c.n_head * c.head_dim)


def block(x: jax.Array, p: Params, angles: jax.Array, mask: jax.Array, c: LlamaConfig) -> jax.Array:
    """One transformer block on the residual stream x `[B, T, D]`; `p` holds this layer's leaves."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"]["scale"], c.rms_eps)
    q = dense(h, p["attn_q"]["kernel"]).reshape(b, t, c.n_head, c.head_dim)
    k = dense(h, p["attn_k"]["kernel"]).reshape(b, t, c.n_head_kv, c.head_dim)
    v = dense(h, p["attn_v"]["kernel"]).reshape(b, t, c.n_head_kv, c.head_dim)
    q, k = apply_rope(q, angles, c.rope_dim), apply_rope(k, angles, c.rope_dim)
    x = x + dense(attention(q, k, v, mask, c), p["attn_output"]["kernel"])
    h = rms_norm(x, p["ffn_norm"]["scale"], c.rms_eps)
    gated = jax.nn.silu(dense(h, p["ffn_gate"]["kernel"])) * dense(h, p["ffn_up"]["kernel"])
    return x + dense(gated, p["ffn_down"]["kernel"])


def positions_and_mask(tokens: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Positions `[B, T]` and the causal attention mask `[B, T, S]`.

    With `valid` (`[B, T]` bool, False at padding, left or right), positions count only
    valid tokens and padding is never attended to, so each row gets the logits it would
    get alone; logits at padded positions are meaningless.
    """
    b, t = tokens.shape
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if valid is None:
        return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.broadcast_to(causal, (b, t, t))
    valid = valid.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    return positions, causal & valid[:, None, :]


def forward(
    params: Params,
    tokens: jax.Array,
    config: LlamaConfig,
    valid: jax.Array | None = None,
    scan_layers: bool = True,
) -> jax.Array:
    """Logits `[B, T, vocab]` (float32) for int tokens `[B, T]`; pure and jit-able.

    `config` and `scan_layers` are static. Token ids must lie in `[0, vocab)`: this function
    cannot raise inside jit, so `Model.logits` checks them first. `scan_layers=False` unrolls
    the layers (same numbers, compile time grows with depth).
    """
    p = params["params"]
    c = config
    positions, mask = positions_and_mask(tokens, valid)
    freq_factors = p["rope"]["freq_factors"] if c.has_rope_freqs else None
    angles = rope_angles(positions, c, freq_factors)
    x = jnp.take(p["token_embd"]["embedding"], tokens, axis=0).astype(jnp.float32)

    step = partial(block, angles=angles, mask=mask, c=c)
    if scan_layers:
        x, _ = lax.scan(lambda h, lp: (step(h, lp), None), x, p["layers"])
    else:
        for i in range(c.n_layer):
            x = step(x, jax.tree.map(lambda a: a[i], p["layers"]))

    x = rms_norm(x, p["output_norm"]["scale"], c.rms_eps)
    if c.tied_output:
        return dense(x, p["token_embd"]["embedding"].T)
    return dense(x, p["output"]["kernel"])


forward_jit = jax.jit(forward, static_argnames=("config", "scan_layers"))
