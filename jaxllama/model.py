"""The Llama forward pass as pure functions of (params, tokens, config).

Numerics follow llama.cpp's graph for GGUF `llama` weights: RMSNorm `x / sqrt(mean(x^2) + eps) * w`,
RoPE on adjacent pairs `(x[2i], x[2i+1])` with llama.cpp's theta recurrence, grouped-query
attention (query head h reads KV head h // n_group), SwiGLU `silu(gate) * up`, output tied to
the embedding when the file has no `output.weight`. Activations and arithmetic are float32
whatever the weight storage dtype (bfloat16 weights are widened, activations are never rounded);
matrix products use full float32 precision on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .tracing.actquant import fake_quant, ggml_gelu, q8_1_sum_correction
from .gguf.config import LlamaConfig
from .errors import InvalidInputError
from . import kernels
from .gguf.blocks import Blocks, native_values
from .gguf.convert import Params
from .parallel.placement import is_placed
from .tracing.probes import (
    ProbeSpec,
    capture_slots,
    emit_stats,
    make_tap,
    probe_shape,
    store_captures,
)

MASKED = -1e30  # finite, so a row with no visible key gives uniform weights, not NaN


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` in float32 with full precision (no TF32 on GPUs).

    A bfloat16 kernel is a storage choice: it is widened to float32 and the activations are
    never rounded, so a bfloat16 model computes exactly what a float32 model with
    bfloat16-rounded weights computes.
    """
    return jnp.einsum(
        "...i,io->...o",
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


GEMV_CHUNK = 2048  # activation floats per chunk: under XLA:CPU's 16 KiB limit for fusing into a dot


def matmul(x: jax.Array, w: jax.Array | Blocks) -> jax.Array:
    """`x [..., K]` times a matrix in float32: a float `kernel [K, N]` (`dense`) or GGUF blocks
    `[N, K]` (`native_dense`). The one place a product's kind of weight is looked at."""
    return native_dense(x, w) if isinstance(w, Blocks) else dense(x, w)


def native_dense(x: jax.Array, w: Blocks) -> jax.Array:
    """`x [B, T, K]` (or `[..., K]`) `@ W.T` for GGUF blocks W `[N, K]` = scale * q (+ offset),
    in float32.

    The kernel is chosen here and only here, from the shapes and the backend:
    - on a mesh (`w.sharded`): XLA's product, which the partitioner splits (the C++ kernels
      run on one device);
    - one token per row (decode steps, T = 1) with the CPU kernels: `kernels.gemv`,
      `kernels.MAX_ROWS` rows per call, which reads the blocks in place (memory-bound: the
      matrix is read once, never widened) and computes each row alike whatever the batch;
    - one row in all without them (GPU/TPU): XLA's fused dequantize-and-multiply;
    - more tokens per row (prompts, scoring): the layer's matrix widened to float32 (the values
      `native_values` gives, bit for bit; by `kernels.dequant` on CPU) and XLA's matrix product,
      compute-bound and far faster than a row-at-a-time kernel.
    The choice depends on the tokens per row, never on the batch, so a prompt's logits do not
    change with the rows it is batched with, nor between `generate`'s prefill and `logits` (XLA
    may block a product differently for another row count, which moves a prompt's logits within
    the float32 reordering bound: tests/test_batch_invariance.py).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k).astype(jnp.float32)
    one_token = len(lead) >= 2 and lead[-1] == 1  # [B, 1, K]: decode steps
    if w.sharded:
        out = xla_native_dense(rows, w.one_layer())
    elif one_token and kernels.available():
        out = gemv_rows(rows, w)
    elif rows.shape[0] == 1:  # pure JAX: XLA fuses the dequantization into a matrix-vector product
        out = xla_native_dense(rows, w.one_layer())
    else:
        out = dequant_dense(rows, w)
    return out.reshape(*lead, -1)


def _transpose_product(g: jax.Array, w: Blocks) -> jax.Array:
    """`g [M, N] @ W` for blocks W `[N, K]`: the transpose of every product above, computed as
    `dequant_dense`'s (W widened one layer, or one slice of rows, at a time, from its blocks)."""
    _, back = jax.vjp(lambda r: _dequant_dense(r, w), jnp.zeros((g.shape[0], w.width), jnp.float32))
    return back(g)[0]


def _linear_in_rows(product: Callable[[jax.Array, Blocks], jax.Array]) -> Callable[[jax.Array, Blocks], jax.Array]:
    """`product(rows, w)`, linear in `rows`, differentiable in `rows` whatever it runs (the C++
    kernels have no derivative rules): its only residual is the blocks themselves, and the
    cotangent is `_transpose_product`, so a gradient through a forward keeps no float32 copy of
    any matrix between the forward and the backward pass. The blocks get no gradient."""
    f = jax.custom_vjp(product)
    f.defvjp(lambda rows, w: (product(rows, w), w), lambda w, g: (_transpose_product(g, w), None))
    return f


def _gemv_rows(rows: jax.Array, w: Blocks) -> jax.Array:
    """`rows [M, K] @ W.T` through `kernels.gemv`, `kernels.MAX_ROWS` rows per call (each row's
    sum is the same whichever call it is in); pure JAX where the kernel is not available."""
    per = kernels.MAX_ROWS
    if rows.shape[0] <= per:
        return kernels.gemv(rows, w, xla_native_dense)
    pad = -rows.shape[0] % per
    chunks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, per, rows.shape[-1])
    out = lax.map(lambda r: kernels.gemv(r, w, xla_native_dense), chunks)
    return out.reshape(-1, out.shape[-1])[: rows.shape[0]]


# The most float32 bytes of one matrix a many-row product builds at once. The default model's
# 113 MB output matrix stays whole (slicing it cost its 512-token prefill ~5%: the slices' outputs
# are copied together); a 152k vocabulary's 545 MB goes in five slices.
DEQUANT_BYTES = 128 << 20


def _dequant_dense(rows: jax.Array, w: Blocks) -> jax.Array:
    """`rows [M, K] @ W.T` for (layer `w.layer` of) blocks W `[N, K]`: W in float32 through
    `kernels.dequant` (exactly `native_values`), then XLA's product.

    A matrix over `DEQUANT_BYTES` in float32 (a 152k-vocabulary output matrix is 545 MB at width
    896, Llama 3 8B's 2.1 GB) is built and multiplied a slice of output rows at a time, one slice
    after the other (`lax.map`), so memory stays bounded whatever the vocabulary. Each output is
    the same dot product either way; only XLA's blocking of the product may differ.
    """
    n, k = w.rows, rows.shape[-1]
    most = max(256, DEQUANT_BYTES // (4 * k) // 256 * 256)  # whole 256-row slices
    if n <= most:
        return jnp.matmul(rows, kernels.dequant(w, native_values).T, precision=lax.Precision.HIGHEST)
    count = -(-n // most)
    even = -(-n // count)  # ceil(n / count): slices as even as whole 256-row ones can be
    per = min(n, -(-even // 256) * 256)
    count = -(-n // per)
    starts = jnp.minimum(jnp.arange(count) * per, n - per)  # the last slice ends at n (overlapping)

    def one(start: jax.Array) -> jax.Array:
        piece = kernels.dequant(w.row_slice(start, per), native_values)
        return jnp.matmul(rows, piece.T, precision=lax.Precision.HIGHEST)

    out = lax.map(one, starts)  # [count, M, per]
    head = jnp.moveaxis(out[:-1], 0, 1).reshape(rows.shape[0], (count - 1) * per)
    return jnp.concatenate([head, out[-1][:, per - (n - (count - 1) * per):]], axis=-1)


gemv_rows = _linear_in_rows(_gemv_rows)
dequant_dense = _linear_in_rows(_dequant_dense)


def xla_native_dense(rows: jax.Array, w: Blocks) -> jax.Array:
    """`rows [M, K] @ W.T` for one layer's blocks, in pure JAX.

    With one row the matrix is written so XLA:CPU fuses the dequantization into the
    matrix-vector product and never builds W in float32: GGUF's `[N, K]` order, `x` of shape
    (1, K) with K under 16 KiB of floats, longer K split into chunks whose partial sums an
    optimization barrier keeps apart (REFERENCE §7). With more rows W is dequantized once per
    call, which costs little next to the matrix product.
    """
    k = rows.shape[-1]
    per_byte = 2 if w.packed else 1
    if rows.shape[0] > 1:
        return jnp.matmul(rows, w.values().T, precision=lax.Precision.HIGHEST)
    sub = w.group
    step = GEMV_CHUNK  # a multiple of 32: whole blocks and whole packed units of 32 values
    parts = []
    for a in range(0, k, step):
        b = min(a + step, k)
        piece = w.replace(
            q=w.q[:, a // per_byte: b // per_byte],
            scale=w.scale[:, a // sub: b // sub],
            offset=None if w.offset is None else w.offset[:, a // sub: b // sub],
            qh=None if w.qh is None else w.qh[:, a // 8: b // 8],  # fifth bits: one byte per 8 values
            # K-quants' factors: one per 256 values (step is a multiple)
            scale_d=None if w.scale_d is None else w.scale_d[:, a // 256: b // 256],
            offset_d=None if w.offset_d is None else w.offset_d[:, a // 256: b // 256],
        )
        parts.append(jnp.matmul(rows[:, a:b], piece.values().T, precision=lax.Precision.HIGHEST))
    if len(parts) > 1:
        parts = list(lax.optimization_barrier(tuple(parts)))
    return sum(parts[1:], parts[0])


def layer_params(layers: Params, layer: jax.Array | int) -> Params:
    """Layer `layer`'s leaves from the layer-stacked `layers`. GGUF blocks stay stacked, reading
    layer `layer` (`Blocks.at`): the CPU kernel reads that layer in place, where slicing it out
    would copy it (a custom call takes whole buffers)."""
    return jax.tree.map(lambda leaf: leaf.at(layer) if isinstance(leaf, Blocks) else leaf[layer], layers,
                        is_leaf=lambda x: isinstance(x, Blocks))


def materialized(x: jax.Array, data: jax.Array) -> jax.Array:
    """`x`, computed once into a buffer of its own.

    XLA:CPU fuses the producer of a small vector into the matrix-vector product that reads it,
    recomputing it for every output row: the attention output's transposes in front of
    `attn_output` made that product 5x slower than its twins in decoding. A conditional on a
    runtime value (`data >= -1`, true for valid slots, -1 marking padding) cannot be folded away,
    so its result is a real buffer; an optimization barrier does not survive XLA:CPU's pipeline.
    A slot below -1 (a bad traced `start`) makes the result NaN: loud, never a silently masked
    attention.
    """
    return lax.cond(jnp.min(data) >= -1, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), x)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, ggml: bool | None = None) -> jax.Array:
    """RMSNorm over the last axis, rounded as llama.cpp's CPU backend rounds ggml_rms_norm
    followed by ggml_mul: float32 squares summed in float64, the mean rounded to float32,
    `1/sqrtf(mean + eps)`, then `(x * s) * scale`.

    Summing in float64 also makes the result independent of how XLA vectorizes the reduction for
    a batch's shape (a float32 sum moved by an ulp between 1 and 8 rows, where the residual
    stream carries massive activations), and an ulp in front of a q8 rounding can move it
    (`--act-quant` relies on it). `ggml=None` does this wherever float64 is at hand (not on
    TPU); `False` sums in float32 (`x * rsqrt(mean + eps) * scale`).
    """
    if ggml is None:
        ggml = jax.default_backend() != "tpu"
    if ggml:  # barriers keep XLA from rewriting `/ n` as `* (1/n)` and `1/sqrt` as an rsqrt
        with jax.enable_x64(True):
            total = jnp.sum(jnp.square(x).astype(jnp.float64), axis=-1, keepdims=True)
            mean_sq = (total / lax.optimization_barrier(jnp.float64(x.shape[-1]))).astype(jnp.float32)
        root = lax.optimization_barrier(jnp.sqrt(mean_sq + np.float32(eps)))
        return (x * (1.0 / root)) * scale.astype(jnp.float32)
    mean_sq = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * lax.rsqrt(mean_sq + eps) * scale.astype(jnp.float32)


def rope_angles(
    positions: jax.Array,
    c: LlamaConfig,
    freq_factors: jax.Array | None,
    base: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Angles `[..., rope_dim // 2]` for integer `positions`, computed as ggml does.

    ggml starts from theta = position and multiplies by base^(-2/rope_dim) once per pair
    (a float32 recurrence, not a power per pair); `rope_freqs` divides each theta and
    linear scaling multiplies it by 1 / factor. `base`/`scale` default to the config's
    (sliding-window layers pass their own).
    """
    base = c.rope_base if base is None else base
    scale = c.rope_scale if scale is None else scale
    step = np.float32(np.float32(base) ** np.float32(-2.0 / c.rope_dim))
    theta = positions.astype(jnp.float32)
    cols = []
    for _ in range(c.rope_dim // 2):
        cols.append(theta)
        theta = theta * step
    angles = jnp.stack(cols, axis=-1)
    if freq_factors is not None:
        angles = angles / freq_factors.astype(jnp.float32)
    if scale != 1.0:
        angles = np.float32(1.0 / scale) * angles
    return angles


Rotation = tuple[jax.Array, jax.Array]  # (cos, sin) of the RoPE angles, [B, T, rope_dim/2] each


def rotation(angles: jax.Array) -> Rotation:
    """cos and sin of the angles, computed once per forward: inside the layers they would be
    recomputed wherever XLA fuses the rotation into a consumer (in decoding, that doubled a step)."""
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rot: Rotation, rope_dim: int, neox: bool = False) -> jax.Array:
    """Rotate the first `rope_dim` dims of x `[B, T, heads, head_dim]` by `rot` (`rotation(angles)`).

    Pair i is (x[2i], x[2i+1]) (llama.cpp's "normal" RoPE, Llama GGUFs) or, with `neox`,
    (x[i], x[i + rope_dim/2]) (Qwen, Gemma).
    """
    part, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    if neox:
        x0, x1 = part[..., :half], part[..., half:]
    else:
        pairs = part.reshape(*part.shape[:-1], half, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rot[0][:, :, None, :], rot[1][:, :, None, :]
    y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    out = jnp.concatenate([y0, y1], axis=-1) if neox else jnp.stack([y0, y1], axis=-1).reshape(part.shape)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation, as ggml_gelu_f32: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))."""
    inner = np.float32(0.7978845608028654) * x * (1.0 + np.float32(0.044715) * x * x)
    return 0.5 * x * (1.0 + jnp.tanh(inner))


ATTN_BLOCK = 512  # queries and keys per attention block: memory grows linearly with the length
NO_WINDOW = 2**30  # the window of a layer that does not slide


class Visibility(NamedTuple):
    """Which keys each query sees: key slot s is visible to query t of row b iff
    `q_slot[b, t] - window < s <= q_slot[b, t]` and `key_ok[b, s]`. Stands in for a `[B, T, S]`
    mask, so the mask is never materialised. `window` is traced (per layer, in the scan):
    `NO_WINDOW` for global layers, the sliding window for sliding ones (llama.cpp masks keys
    with `q_pos - k_pos >= n_swa`; padding sits only before or after a row's tokens, so slot
    distances are position distances)."""

    q_slot: jax.Array  # [B, T] int: the cache slot of each query (the causal limit)
    key_ok: jax.Array  # [B, S] bool: False at padding
    window: jax.Array | int = NO_WINDOW


def attention(q: jax.Array, k: jax.Array, v: jax.Array, vis: Visibility, c: LlamaConfig,
              block: int = ATTN_BLOCK, layer: jax.Array | None = None, kernel: bool = False) -> jax.Array:
    """Grouped-query attention. q `[B, T, H, d]`, k/v `[B, S, K, d]` -> `[B, T, H*d]`.

    With `layer`, k and v are a whole layer-stacked cache `[L, B, S, K, d]` and only this
    layer's key blocks that are needed are read (decoding costs the filled length, not S).

    Computed blockwise with an online softmax (float32 running max, sum and output), so scores
    exist only as `[B, K, G, block, block]` tiles: peak memory grows linearly with T and S, not
    as T * S. Key blocks after the last query slot of a query block are skipped (causality), and
    so are blocks wholly before the window. Up to `block` queries and keys it is one tile: the
    plain softmax, normalised after `@ v`.

    With `kernel` (one device), one query per row against a stacked cache is `kernels.attend`,
    which reads exactly the visible slots (this function being its pure-JAX fallback).
    """
    if kernel and layer is not None and q.shape[1] == 1:
        b = q.shape[0]
        out = kernels.attend(q.reshape(b, c.n_head_kv, c.n_group, c.head_dim), k, v, layer, vis.q_slot[:, 0],
                             vis.key_ok, vis.window, c.query_scale,
                             fallback=lambda gq, k, v: attention(gq.reshape(q.shape), k, v, vis, c, block, layer).reshape(
                                 b, c.n_head_kv, c.n_group, c.head_dim))
        return out.reshape(b, 1, c.n_head * c.head_dim)
    if layer is None:
        k, v = k[None], v[None]
        layer = jnp.int32(0)
    b, t = q.shape[:2]
    s = k.shape[2]
    nq, nk = -(-t // block), -(-s // block)
    qb, kb = -(-t // nq), -(-s // nk)  # balanced blocks: little padding
    # heads first, `[B, K, G, T, d]`: scores are `[B, K, G, qb, kb]` tiles whose mask broadcasts
    # over the leading dims and whose softmax reduces the contiguous last one (the `[B, T, K, G,
    # S]` order made XLA:CPU transpose every tile twice; prefill of 512 tokens spent 2.4x as long
    # in attention)
    q = q.reshape(b, t, c.n_head_kv, c.n_group, c.head_dim).transpose(0, 2, 3, 1, 4)
    q_slot, key_ok, window = vis.q_slot, vis.key_ok, vis.window
    if nq * qb != t:  # padded queries see nothing; their rows are dropped below
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, nq * qb - t), (0, 0)))
        q_slot = jnp.pad(q_slot, ((0, 0), (0, nq * qb - t)), constant_values=-1)
    scale = np.float32(c.query_scale)

    def tile(j, carry, q_blk, slot_blk):
        """Fold key block j into the running (max, sum, output) of one query block."""
        m, l, acc = carry
        # The last block is read from `s - kb` when `nk * kb > s`: its keys before `j * kb` were
        # folded in already and are masked. (Padding k and v instead would copy the whole
        # layer-stacked cache at every layer.)
        start = jnp.minimum(j * kb, s - kb)
        at = (layer, 0, start, 0, 0)
        k_blk = lax.dynamic_slice(k, at, (1, b, kb, *k.shape[3:]))[0]
        v_blk = lax.dynamic_slice(v, at, (1, b, kb, *v.shape[3:]))[0]
        ok = lax.dynamic_slice_in_dim(key_ok, start, kb, axis=1)
        keys = start + jnp.arange(kb)
        near = (keys[None, None, :] > slot_blk[:, :, None] - window) & (keys >= j * kb)[None, None, :]
        seen = (keys[None, None, :] <= slot_blk[:, :, None]) & near & ok[:, None, :]  # [B, qb, kb]
        scores = jnp.einsum("bkgtd,bskd->bkgts", q_blk, k_blk, precision=lax.Precision.HIGHEST) * scale
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
        else:  # only the key blocks from the window's start to the block's last query slot
            last = jnp.clip(slot_blk.max() // kb + 1, 1, nk)
            first = jnp.clip((jnp.maximum(slot_blk, 0).min() - window + 1) // kb, 0, last - 1)
            m, l, acc = lax.fori_loop(first, last, lambda j, cr: tile(j, cr, q_blk, slot_blk), init)
        return acc * (1.0 / l)[..., None]  # [B, K, G, qb, d]

    if nq == 1:
        out = query_block(q, q_slot)
    else:
        q_blocks = q.reshape(b, c.n_head_kv, c.n_group, nq, qb, c.head_dim).transpose(3, 0, 1, 2, 4, 5)
        out = lax.map(lambda xs: query_block(*xs), (q_blocks, q_slot.reshape(b, nq, qb).swapaxes(0, 1)))
        out = out.transpose(1, 2, 3, 0, 4, 5)  # [B, K, G, nq, qb, d]
    # [B, T, K, G, d]: the order the heads are merged in
    out = out.reshape(b, c.n_head_kv, c.n_group, nq * qb, c.head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, nq * qb, c.n_head * c.head_dim)[:, :t]


Tap = Callable[[str, jax.Array], jax.Array]


def no_tap(name: str, x: jax.Array) -> jax.Array:
    """The default tap: observe nothing, change nothing (adds nothing to the program)."""
    return x


def block(
    x: jax.Array,
    p: Params,
    rot: Rotation,
    vis: Visibility,
    c: LlamaConfig,
    tap: Tap = no_tap,
    act_quant: Mapping[str, str | None] | None = None,
    kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    kernel: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One transformer block on the residual stream x `[B, T, D]`; `p` holds this layer's leaves.

    Every named intermediate passes through `tap(name, value)` (see `probes.LAYER_PROBES`),
    which may record it or replace it. `act_quant` maps a matrix name to the llama.cpp
    activation type to emulate in front of it (see `actquant`). With `kv = (cache_k,
    cache_v, layer, start)` (layer-stacked caches `[L, B, S, K, d]`), this step's keys and values
    are written at `[layer, :, start]` and attention reads that layer's filled slots (`vis` then
    covers S slots; `kernel` lets one-token steps attend through the CPU kernel). Returns the new
    residual stream and the updated caches (None without `kv`).
    """
    aq = act_quant or {}

    def mm(name: str, h: jax.Array) -> jax.Array:
        return project(h, p[name], aq.get(name))

    def heads(name: str, h: jax.Array, n: int) -> jax.Array:
        return mm(name, h).reshape(b, t, n, c.head_dim)

    def rope(name: str, y: jax.Array) -> jax.Array:
        if c.qk_norm:  # per-head RMSNorm before RoPE (Qwen3, Gemma 3)
            y = tap(f"{name}_normed", rms_norm(y, p[f"attn_{name[0].lower()}_norm"]["scale"], c.rms_eps))
        return tap(name, apply_rope(y, rot, c.rope_dim, c.rope_neox))

    b, t, _ = x.shape
    h = tap("attn_norm", rms_norm(x, p["attn_norm"]["scale"], c.rms_eps))
    q = rope("Qcur", heads("attn_q", h, c.n_head))
    k = rope("Kcur", heads("attn_k", h, c.n_head_kv))
    v = tap("Vcur", heads("attn_v", h, c.n_head_kv))
    cache, layer = None, None
    if kv is not None:  # write this step's keys and values into the layer-stacked cache, in place
        ck, cv, layer, start = kv
        at = (layer, 0, start, 0, 0)
        cache = (lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], at),
                 lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], at))
        k, v = cache
    a = tap("kqv_out", materialized(attention(q, k, v, vis, c, layer=layer, kernel=kernel), vis.q_slot))
    o = mm("attn_output", a)
    if c.post_norms:  # Gemma's sandwich: normalise the branch before the residual add
        x = tap("sa_out", x + tap("attn_post_norm", rms_norm(o, p["post_attention_norm"]["scale"], c.rms_eps)))
    else:
        x = tap("ffn_inp", x + tap("attn_out", o))
    h = tap("ffn_norm", rms_norm(x, p["ffn_norm"]["scale"], c.rms_eps))
    gate, up = tap("ffn_gate", mm("ffn_gate", h)), tap("ffn_up", mm("ffn_up", h))
    if c.activation == "gelu_tanh":
        gelu = ggml_gelu if aq.get("gelu") == "ggml_f16" else gelu_tanh
        g = tap("ffn_geglu", gelu(gate) * up)
    else:
        g = tap("ffn_swiglu", jax.nn.silu(gate) * up)
    f = tap("ffn_out", mm("ffn_down", g))
    if c.post_norms:
        f = tap("ffn_post_norm", rms_norm(f, p["post_ffw_norm"]["scale"], c.rms_eps))
    x = x + f
    if "control" in p:  # a control vector (`Model.with_control_vector`), added where llama.cpp adds it
        x = x + p["control"]
    return tap("l_out", x), cache


def embed(p: Params, tokens: jax.Array, c: LlamaConfig, tap: Tap = no_tap) -> jax.Array:
    """Token embeddings `[B, T, D]` in float32 (times `embed_scale`, sqrt(d_model) for Gemma)."""
    table = p["token_embd"]["embedding"]
    if isinstance(table, Blocks):  # gather the rows' blocks, then dequantize just those rows
        x = table.take(tokens).values()
    else:
        x = jnp.take(table, tokens, axis=0).astype(jnp.float32)
    x = tap("inp_embd", x)
    if c.embed_scale != 1.0:
        x = tap("inp_scaled", x * np.float32(c.embed_scale))
    return x


def head(p: Params, x: jax.Array, c: LlamaConfig, aq: Mapping[str, str | None], tap: Tap = no_tap) -> jax.Array:
    """Final RMSNorm and output projection (the embedding, transposed, when tied): logits."""
    x = tap("result_norm", rms_norm(x, p["output_norm"]["scale"], c.rms_eps))
    leaf = {**p.get("output", {}), "kernel": output_kernel(p, c)}
    return tap("result_output", project(x, leaf, aq.get("output")))


def output_kernel(p: Params, c: LlamaConfig) -> jax.Array | Blocks:
    """The output projection's kernel: blocks `[V, D]` or a float `[D, V]` (the embedding,
    transposed, when tied: quantized embedding rows are already the output's rows)."""
    if not c.tied_output:
        return p["output"]["kernel"]
    table = p["token_embd"]["embedding"]
    return table if isinstance(table, Blocks) else table.T


def project(x: jax.Array, leaf: Params, act_kind: str | None) -> jax.Array:
    """`x @ leaf["kernel"]`, optionally as llama.cpp computes it on quantized weights.

    With `act_kind`, activations take llama.cpp's round trip first (`actquant.fake_quant`); a
    Q4_1/Q5_1 leaf that also holds `mins` gets the block-sum correction of its Q8_1 dot product.
    """
    xq = fake_quant(x, act_kind)
    out = matmul(xq, leaf["kernel"])
    if act_kind == "q8_1" and "mins" in leaf:
        out = out + dense(q8_1_sum_correction(x), leaf["mins"])
    if "bias" in leaf:
        out = out + leaf["bias"]
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


Kinds = tuple[Rotation, Rotation | None]  # RoPE of global layers, of sliding layers (None: none slide)


def layer_kinds(c: LlamaConfig, positions: jax.Array, freq_factors: jax.Array | None) -> Kinds:
    """RoPE rotations of global layers and, when some layer slides, of sliding layers (their own
    base and scale)."""
    glob = rotation(rope_angles(positions, c, freq_factors))
    if not c.sliding_window or not any(c.swa_layers):
        return glob, None
    return glob, rotation(rope_angles(positions, c, freq_factors, c.rope_base_swa, c.rope_scale_swa))


def choose_kind(slides: jax.Array, kinds: Kinds, vis: Visibility, c: LlamaConfig) -> tuple[Rotation, Visibility]:
    """This layer's rotation and visibility, picked by its traced flag (one scan serves both kinds)."""
    glob, swa = kinds
    if swa is None:
        return glob, vis
    window = jnp.where(slides, c.sliding_window, NO_WINDOW)
    rot = (jnp.where(slides, swa[0], glob[0]), jnp.where(slides, swa[1], glob[1]))
    return rot, vis._replace(window=window)


@dataclass(frozen=True)
class Run:
    """What one pass of the model computes, beyond its inputs (static: part of the compiled
    program's identity). Every way of running the model is one of these through `run_model`'s
    single layer scan; a new way is a field here and a line in the body, not another loop.

    probes: statistics, captures and interventions (`tracing.probes`); act_quant: llama.cpp's
    activation quantization to emulate (`actquant.act_quant_plan`); scan_layers: `lax.scan`
    over layers, or unrolled (same numbers, compile time grows with depth); head: False stops at
    the residual stream after the last layer (scoring applies the head itself, a block at a
    time); last_only: the head sees each row's last token only (a prefill's logits).
    """

    probes: ProbeSpec = ProbeSpec()
    act_quant: tuple[tuple[str, str | None], ...] | None = None
    scan_layers: bool = True
    head: bool = True
    last_only: bool = False


class Cached(NamedTuple):
    """A KV cache taking part in a pass: `k`, `v` `[L, B, S, K, d]` and the first slot written."""

    k: jax.Array
    v: jax.Array
    start: jax.Array


def run_model(params: Params, tokens: jax.Array, config: LlamaConfig, run: Run, positions: jax.Array,
              vis: Visibility, valid: jax.Array, cached: Cached | None = None,
              resume: tuple[jax.Array, jax.Array] | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array], Cached | None]:
    """The one forward pass every entry point runs: embedding, one scanned layer body, head.

    Returns (logits `[B, T, V]` or, with `run.head` False, the residual stream `[B, T, D]`;
    captures `{probe: [kept layers, B, T, ...]}` and global ones `{probe: [B, T, ...]}`; the
    updated cache, or None). `positions`, `vis` and `valid` (`[B, T]`: False at padding) come
    from the caller: a plain forward numbers tokens from 0, a cached step from its slots.

    `resume = (x, start)` runs from the middle: `x [B, T, D]` is the residual stream entering
    layer `start` (traced), the layers before it are skipped (a conditional in the scan: they
    cost nothing) and the embedding is not computed. A patching sweep resumes each cell from the
    corrupted run's stream at the patched layer. Interventions only: no statistics or captures.
    """
    p, c, spec = params["params"], config, run.probes
    if resume is not None and (spec.stats or spec.capture or cached is not None):
        raise InvalidInputError("a resumed run takes interventions only: no statistics, captures or cache")
    aq = dict(run.act_quant or ())
    freq_factors = p["rope"]["freq_factors"] if c.has_rope_freqs else None
    kinds = layer_kinds(c, positions, freq_factors)
    glob: dict[str, jax.Array] = {}
    gtap = make_tap(spec, jnp.int32(-1), glob, positions) if spec.active else no_tap
    x = embed(p, tokens, c, gtap) if resume is None else resume[0]

    kept = capture_slots(spec, c)
    bufs = {
        name: jnp.zeros((sum(s >= 0 for s in kept), *probe_shape(name, c, *tokens.shape)), jnp.float32)
        for name in spec.capture
        if name in c.layer_probes
    }
    slot_table = jnp.asarray(kept, jnp.int32)
    # one query per row against the cache through the attention kernel, on one device (on a mesh,
    # `rules.shard_params`, XLA's attention partitions)
    kernel = cached is not None and not is_placed(params)

    def body(carry, xs):
        x, bufs, kv = carry
        layer, slides = xs
        seen: dict[str, jax.Array] = {}
        tap = make_tap(spec, layer, seen, positions) if spec.active else no_tap
        rot, layer_vis = choose_kind(slides, kinds, vis, c)
        step = None if kv is None else (kv[0], kv[1], layer, cached.start)
        if resume is not None:  # layers before the start are skipped
            x = lax.cond(layer >= resume[1], lambda h: block(h, layer_params(p["layers"], layer), rot, layer_vis, c, tap,
                                                             aq, kernel=kernel)[0], lambda h: h, x)
            return (x, bufs, kv), None
        x, kv = block(x, layer_params(p["layers"], layer), rot, layer_vis, c, tap, aq, step, kernel=kernel)
        emit_stats(spec, layer, seen, valid, c.layer_probes, positions)
        return (x, store_captures(bufs, seen, slot_table[layer]), kv), None

    xs = (jnp.arange(c.n_layer, dtype=jnp.int32), jnp.asarray(c.swa_layers))
    carry = (x, bufs, None if cached is None else (cached.k, cached.v))
    if run.scan_layers:
        carry, _ = lax.scan(body, carry, xs)
    else:
        for i in range(c.n_layer):
            carry, _ = body(carry, jax.tree.map(lambda a: a[i], xs))
    x, bufs, kv = carry
    out_cache = None if kv is None else Cached(kv[0], kv[1], cached.start)
    if not run.head:  # the global probes captured so far (the embedding's) come back too
        return x, {**bufs, **{n: glob[n] for n in spec.capture if n in glob}}, out_cache
    if run.last_only:  # the embedding's statistics first, for every token; then the head's, for the last
        emit_stats(spec, jnp.int32(-1), glob, valid, c.global_probes, positions)
        x, valid, positions, glob = x[:, -1:], valid[:, -1:], positions[:, -1:], {}
        gtap = make_tap(spec, jnp.int32(-1), glob, positions) if spec.active else no_tap
    logits = head(p, x, c, aq, gtap)
    emit_stats(spec, jnp.int32(-1), glob, valid, c.global_probes, positions)
    captures = {**bufs, **{n: glob[n] for n in spec.capture if n in c.global_probes}}
    return logits, captures, out_cache


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
    positions, vis = positions_and_mask(tokens, valid)
    run = Run(probes or ProbeSpec(), act_quant, scan_layers)
    logits, captures, _ = run_model(params, tokens, config, run, positions, vis, vis.key_ok)
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
    positions, vis = positions_and_mask(tokens, valid)
    return run_model(params, tokens, config, Run(act_quant=act_quant, head=False), positions, vis, vis.key_ok)[0]


def forward_step(
    params: Params,
    tokens: jax.Array,
    cache: dict[str, jax.Array],
    start: jax.Array,
    pad: jax.Array,
    config: LlamaConfig,
    act_quant: tuple[tuple[str, str | None], ...] | None = None,
    probes: ProbeSpec | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run tokens `[B, T]` that occupy cache slots `start .. start+T-1`; return logits and the new cache.

    The KV cache is `{"k": [L, B, S, K, d], "v": ...}` (see `init_cache`), carried through the
    layer scan and updated in place (donate it), each layer writing its slots and reading only
    the key blocks up to the last filled one (one-token steps on one CPU device: exactly the
    visible slots, through `kernels.attend`). Rows are left-padded: row b's first real token sits in slot
    `pad[b]`, so its positions are `slot - pad[b]`, and slots before `pad[b]` are never
    attended to. Prefill is one call with the (padded) prompt at `start = 0`; each decode step
    is a call with one token per row. `probes` (static) sends statistics and applies
    interventions as in `forward`, for the tokens of this call; captures are not supported here.
    `last_only` (static; a prefill's choice) gives logits `[B, 1, V]` of each row's last token
    alone: the output matrix then multiplies B rows, not B * T, and the probes of the final norm
    and output see that position only.
    """
    b, t = tokens.shape
    s = cache["k"].shape[2]
    check_slots(start, t, s)
    spec = probes or ProbeSpec()
    if spec.capture:
        raise InvalidInputError("capture is not supported in the cached decode step (generation); "
                                "capture with a plain forward (Model.logits) of the generated tokens")
    slots = start + jnp.arange(t)
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    vis = Visibility(jnp.broadcast_to(slots, (b, t)), jnp.arange(s)[None, :] >= pad[:, None])
    valid = slots[None, :] >= pad[:, None]
    run = Run(spec, act_quant, last_only=last_only)
    logits, _, out = run_model(params, tokens, config, run, positions, vis, valid, Cached(cache["k"], cache["v"], start))
    return logits, {"k": out.k, "v": out.v}


def check_slots(start: Any, t: int, s: int) -> None:
    """Refuse a concrete `start` whose `t` slots do not fit a cache of `s` slots.

    `dynamic_update_slice` would silently clamp it and overwrite other tokens' keys. Inside jit
    `start` is traced and cannot be checked here; the decode loop keeps it in range itself.
    """
    if isinstance(start, jax.core.Tracer):
        return
    first = int(np.asarray(start))
    if first < 0 or first + t > s:
        raise InvalidInputError(f"start: cache slots {first}..{first + t - 1} are outside the cache's 0..{s - 1}")


def cache_shape(config: LlamaConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of each of a KV cache's k and v: `[L, B, S, K, d]`."""
    return (config.n_layer, batch, length, config.n_head_kv, config.head_dim)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of `length` slots (float32, like llama.cpp's F32 cache)."""
    shape = cache_shape(config, batch, length)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


forward_jit = jax.jit(forward, static_argnames=("config", "scan_layers", "probes", "act_quant"))
forward_capture_jit = jax.jit(forward_capture, static_argnames=("config", "scan_layers", "probes", "act_quant"))
