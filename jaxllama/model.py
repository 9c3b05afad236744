"""The Llama forward pass as pure functions of (params, tokens, config).

Numerics follow llama.cpp's graph for GGUF `llama` weights: RMSNorm `x / sqrt(mean(x^2) + eps) * w`,
RoPE on adjacent pairs `(x[2i], x[2i+1])` with llama.cpp's theta recurrence, grouped-query
attention (query head h reads KV head h // n_group), SwiGLU `silu(gate) * up`, output tied to
the embedding when the file has no `output.weight`. Activations are float32 whatever the
weight dtype; matrix products use full float32 precision on every backend.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .tracing.actquant import fake_quant, q8_1_sum_correction
from .gguf.config import LlamaConfig
from .gguf.convert import Params
from .tracing.probes import (
    GLOBAL_PROBES,
    LAYER_PROBES,
    ProbeSpec,
    capture_slots,
    emit_stats,
    make_tap,
    probe_shape,
    store_captures,
)

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


ATTN_BLOCK = 512  # queries and keys per attention block: memory grows linearly with the length


class Visibility(NamedTuple):
    """Which keys each query sees: key slot s is visible to query t of row b iff
    `s <= q_slot[b, t]` and `key_ok[b, s]`. Stands in for a `[B, T, S]` mask, so the mask is
    never materialised."""

    q_slot: jax.Array  # [B, T] int: the cache slot of each query (the causal limit)
    key_ok: jax.Array  # [B, S] bool: False at padding


def attention(q: jax.Array, k: jax.Array, v: jax.Array, vis: Visibility, c: LlamaConfig,
              block: int = ATTN_BLOCK) -> jax.Array:
    """Grouped-query attention. q `[B, T, H, d]`, k/v `[B, S, K, d]` -> `[B, T, H*d]`.

    Computed blockwise with an online softmax (float32 running max, sum and output), so scores
    exist only as `[B, K, G, block, block]` tiles: peak memory grows linearly with T and S, not
    as T * S. Key blocks after the last query slot of a query block are skipped (causality).
    Up to `block` queries and keys it is one tile: the plain softmax, normalised after `@ v`.
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    nq, nk = -(-t // block), -(-s // block)
    qb, kb = -(-t // nq), -(-s // nk)  # balanced blocks: little padding
    q = q.reshape(b, t, c.n_head_kv, c.n_group, c.head_dim)
    q_slot, key_ok = vis.q_slot, vis.key_ok
    if nq * qb != t:  # padded queries see nothing; their rows are dropped below
        q = jnp.pad(q, ((0, 0), (0, nq * qb - t), (0, 0), (0, 0), (0, 0)))
        q_slot = jnp.pad(q_slot, ((0, 0), (0, nq * qb - t)), constant_values=-1)
    if nk * kb != s:
        k = jnp.pad(k, ((0, 0), (0, nk * kb - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, nk * kb - s), (0, 0), (0, 0)))
        key_ok = jnp.pad(key_ok, ((0, 0), (0, nk * kb - s)))
    scale = np.float32(1.0 / np.sqrt(c.head_dim))

    def tile(j, carry, q_blk, slot_blk):
        """Fold key block j into the running (max, sum, output) of one query block."""
        m, l, acc = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * kb, kb, axis=1)
        v_blk = lax.dynamic_slice_in_dim(v, j * kb, kb, axis=1)
        ok = lax.dynamic_slice_in_dim(key_ok, j * kb, kb, axis=1)
        keys = j * kb + jnp.arange(kb)
        seen = (keys[None, None, :] <= slot_blk[:, :, None]) & ok[:, None, :]  # [B, qb, kb]
        scores = jnp.einsum("btkgd,bskd->bkgts", q_blk, k_blk, precision=lax.Precision.HIGHEST) * scale
        scores = jnp.where(seen[:, None, None], scores, MASKED)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p, v_blk, precision=lax.Precision.HIGHEST)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv

    def query_block(q_blk: jax.Array, slot_blk: jax.Array) -> jax.Array:
        shape = (b, c.n_head_kv, c.n_group, qb)
        init = (jnp.full(shape, MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, c.head_dim), jnp.float32))
        if nk == 1:
            m, l, acc = tile(0, init, q_blk, slot_blk)
        else:  # only the key blocks up to the block's last query slot
            last = jnp.clip(slot_blk.max() // kb + 1, 1, nk)
            m, l, acc = lax.fori_loop(0, last, lambda j, cr: tile(j, cr, q_blk, slot_blk), init)
        return acc / l[..., None]  # [B, K, G, qb, d]

    if nq == 1:
        out = query_block(q, q_slot)[None]
    else:
        q_blocks = q.reshape(b, nq, qb, *q.shape[2:]).swapaxes(0, 1)
        out = lax.map(lambda xs: query_block(*xs), (q_blocks, q_slot.reshape(b, nq, qb).swapaxes(0, 1)))
    out = jnp.einsum("nbkgtd->bntkgd", out).reshape(b, nq * qb, c.n_head * c.head_dim)
    return out[:, :t]


Tap = Callable[[str, jax.Array], jax.Array]


def no_tap(name: str, x: jax.Array) -> jax.Array:
    """The default tap: observe nothing, change nothing (adds nothing to the program)."""
    return x


def block(
    x: jax.Array,
    p: Params,
    angles: jax.Array,
    vis: Visibility,
    c: LlamaConfig,
    tap: Tap = no_tap,
    act_quant: Mapping[str, str | None] | None = None,
    kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One transformer block on the residual stream x `[B, T, D]`; `p` holds this layer's leaves.

    Every named intermediate passes through `tap(name, value)` (see `probes.LAYER_PROBES`),
    which may record it or replace it. `act_quant` maps a matrix name to the llama.cpp
    activation type to emulate in front of it (see `actquant`). With `kv = (cache_k,
    cache_v, start)` (caches `[B, S, K, d]`), this step's keys and values are written at slot
    `start` and attention reads the whole cache (`vis` then covers S slots). Returns the new
    residual stream and the updated caches (None without `kv`).
    """
    aq = act_quant or {}

    def mm(name: str, h: jax.Array) -> jax.Array:
        return project(h, p[name], aq.get(name))

    b, t, _ = x.shape
    h = tap("attn_norm", rms_norm(x, p["attn_norm"]["scale"], c.rms_eps))
    q = tap("Qcur", apply_rope(mm("attn_q", h).reshape(b, t, c.n_head, c.head_dim), angles, c.rope_dim))
    k = tap("Kcur", apply_rope(mm("attn_k", h).reshape(b, t, c.n_head_kv, c.head_dim), angles, c.rope_dim))
    v = tap("Vcur", mm("attn_v", h).reshape(b, t, c.n_head_kv, c.head_dim))
    cache = None
    if kv is not None:
        ck, cv, start = kv
        cache = (
            lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), start, axis=1),
            lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), start, axis=1),
        )
        k, v = cache
    a = tap("kqv_out", attention(q, k, v, vis, c))
    x = tap("ffn_inp", x + tap("attn_out", mm("attn_output", a)))
    h = tap("ffn_norm", rms_norm(x, p["ffn_norm"]["scale"], c.rms_eps))
    gate, up = tap("ffn_gate", mm("ffn_gate", h)), tap("ffn_up", mm("ffn_up", h))
    s = tap("ffn_swiglu", jax.nn.silu(gate) * up)
    return tap("l_out", x + tap("ffn_out", mm("ffn_down", s))), cache


def embed(p: Params, tokens: jax.Array) -> jax.Array:
    """Token embeddings `[B, T, D]` in float32."""
    return jnp.take(p["token_embd"]["embedding"], tokens, axis=0).astype(jnp.float32)


def head(p: Params, x: jax.Array, c: LlamaConfig, aq: Mapping[str, str | None], tap: Tap = no_tap) -> jax.Array:
    """Final RMSNorm and output projection (the embedding, transposed, when tied): logits."""
    x = tap("result_norm", rms_norm(x, p["output_norm"]["scale"], c.rms_eps))
    leaf = dict(p.get("output", {}))
    if c.tied_output:
        leaf["kernel"] = p["token_embd"]["embedding"].T
    return tap("result_output", project(x, leaf, aq.get("output")))


def project(x: jax.Array, leaf: Params, act_kind: str | None) -> jax.Array:
    """`x @ leaf["kernel"]`, optionally as llama.cpp computes it on quantized weights.

    With `act_kind`, activations take llama.cpp's round trip first (`actquant.fake_quant`); a
    Q4_1/Q5_1 leaf that also holds `mins` gets the block-sum correction of its Q8_1 dot product.
    """
    out = dense(fake_quant(x, act_kind), leaf["kernel"])
    if act_kind == "q8_1" and "mins" in leaf:
        out = out + dense(q8_1_sum_correction(x), leaf["mins"])
    return out


def positions_and_mask(tokens: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, Visibility]:
    """Positions `[B, T]` and the causal visibility of keys (see `Visibility`).

    With `valid` (`[B, T]` bool, False at padding, left or right), positions count only
    valid tokens and padding is never attended to, so each row gets the logits it would
    get alone; logits at padded positions are meaningless.
    """
    b, t = tokens.shape
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    if valid is None:
        return slots, Visibility(slots, jnp.ones((b, t), bool))
    valid = valid.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    return positions, Visibility(slots, valid)


def forward(
    params: Params,
    tokens: jax.Array,
    config: LlamaConfig,
    valid: jax.Array | None = None,
    scan_layers: bool = True,
    probes: ProbeSpec | None = None,
    act_quant: tuple[tuple[str, str | None], ...] | None = None,
) -> jax.Array:
    """Logits `[B, T, vocab]` (float32) for int tokens `[B, T]`; pure and jit-able.

    `config`, `scan_layers`, `probes` and `act_quant` are static. Token ids must lie in
    `[0, vocab)`: this function cannot raise inside jit, so `Model.logits` checks them first.
    `scan_layers=False` unrolls the layers (same numbers, compile time grows with depth).
    `probes` selects statistics (sent through `jax.debug.callback`) and interventions; use
    `forward_capture` to also get captured activations. `act_quant` emulates llama.cpp's
    activation quantization (`actquant.act_quant_plan`).
    """
    return forward_capture(params, tokens, config, valid, scan_layers, probes, act_quant)[0]


def forward_capture(
    params: Params,
    tokens: jax.Array,
    config: LlamaConfig,
    valid: jax.Array | None = None,
    scan_layers: bool = True,
    probes: ProbeSpec | None = None,
    act_quant: tuple[tuple[str, str | None], ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`forward`, also returning the activations `probes.capture` asks for.

    Captures are `{probe: [n_layers_kept, B, T, ...]}` for layer probes (layers in
    `probes.capture_layers`, ascending) and `{probe: [B, T, ...]}` for global ones.
    """
    p = params["params"]
    c = config
    spec = probes or ProbeSpec()
    aq = dict(act_quant or ())
    positions, vis = positions_and_mask(tokens, valid)
    valid_rows = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    freq_factors = p["rope"]["freq_factors"] if c.has_rope_freqs else None
    angles = rope_angles(positions, c, freq_factors)

    glob: dict[str, jax.Array] = {}
    gtap = make_tap(spec, jnp.int32(-1), glob, positions)
    x = gtap("inp_embd", embed(p, tokens))

    kept = capture_slots(spec, c)
    bufs = {
        name: jnp.zeros((sum(s >= 0 for s in kept), *probe_shape(name, c, *tokens.shape)), jnp.float32)
        for name in spec.capture
        if name in LAYER_PROBES
    }
    slot_table = jnp.asarray(kept, jnp.int32)

    def body(carry, xs):
        x, bufs = carry
        lp, layer = xs
        seen: dict[str, jax.Array] = {}
        x, _ = block(x, lp, angles, vis, c, make_tap(spec, layer, seen, positions) if spec.active else no_tap, aq)
        emit_stats(spec, layer, seen, valid_rows, LAYER_PROBES)
        bufs = store_captures(bufs, seen, slot_table[layer])
        return (x, bufs), None

    layer_ids = jnp.arange(c.n_layer, dtype=jnp.int32)
    if scan_layers:
        (x, bufs), _ = lax.scan(body, (x, bufs), (p["layers"], layer_ids))
    else:
        for i in range(c.n_layer):
            (x, bufs), _ = body((x, bufs), (jax.tree.map(lambda a: a[i], p["layers"]), layer_ids[i]))

    logits = head(p, x, c, aq, gtap)
    emit_stats(spec, jnp.int32(-1), glob, valid_rows, GLOBAL_PROBES)
    captures = {**bufs, **{n: glob[n] for n in spec.capture if n in GLOBAL_PROBES}}
    return logits, captures


def forward_hidden(
    params: Params,
    tokens: jax.Array,
    config: LlamaConfig,
    valid: jax.Array | None = None,
    act_quant: tuple[tuple[str, str | None], ...] | None = None,
) -> jax.Array:
    """The residual stream after the last layer `[B, T, D]`: `forward` without the head.

    Scoring applies `head` to the positions it needs, a block at a time, so no `[B, T, vocab]`
    array is built; same numbers as `forward` (no probes here).
    """
    p = params["params"]
    c = config
    aq = dict(act_quant or ())
    positions, vis = positions_and_mask(tokens, valid)
    angles = rope_angles(positions, c, p["rope"]["freq_factors"] if c.has_rope_freqs else None)

    def body(x, lp):
        return block(x, lp, angles, vis, c, no_tap, aq)[0], None

    return lax.scan(body, embed(p, tokens), p["layers"])[0]


def forward_step(
    params: Params,
    tokens: jax.Array,
    cache: dict[str, jax.Array],
    start: jax.Array,
    pad: jax.Array,
    config: LlamaConfig,
    act_quant: tuple[tuple[str, str | None], ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run tokens `[B, T]` that occupy cache slots `start .. start+T-1`; return logits and the new cache.

    The KV cache is `{"k": [L, B, S, K, d], "v": ...}` (see `init_cache`), stacked per layer so
    the layer scan carries it. Rows are left-padded: row b's first real token sits in slot
    `pad[b]`, so its positions are `slot - pad[b]`, and slots before `pad[b]` are never
    attended to. Prefill is one call with the (padded) prompt at `start = 0`; each decode step
    is a call with one token per row.
    """
    p = params["params"]
    c = config
    aq = dict(act_quant or ())
    b, t = tokens.shape
    s = cache["k"].shape[2]
    slots = start + jnp.arange(t)
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    vis = Visibility(jnp.broadcast_to(slots, (b, t)), jnp.arange(s)[None, :] >= pad[:, None])
    freq_factors = p["rope"]["freq_factors"] if c.has_rope_freqs else None
    angles = rope_angles(positions, c, freq_factors)

    def body(x, xs):
        lp, ck, cv = xs
        x, (ck, cv) = block(x, lp, angles, vis, c, no_tap, aq, (ck, cv, start))
        return x, (ck, cv)

    x, (k, v) = lax.scan(body, embed(p, tokens), (p["layers"], cache["k"], cache["v"]))
    return head(p, x, c, aq), {"k": k, "v": v}


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of `length` slots (float32, like llama.cpp's F32 cache)."""
    shape = (config.n_layer, batch, length, config.n_head_kv, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


forward_jit = jax.jit(forward, static_argnames=("config", "scan_layers", "probes", "act_quant"))
forward_capture_jit = jax.jit(forward_capture, static_argnames=("config", "scan_layers", "probes", "act_quant"))
