"""Dequantization of GGML block formats in JAX, bit for bit equal to `gguf.quants`.

Each kernel maps uint8 blocks `[n, type_size]` to float32 values `[n, block_size]` with the
same float32 operations, in the same order, as `gguf.quants` (itself a port of ggml's
`dequantize_row_*`), so results agree bit for bit (NaN payloads aside); tests check this on
random blocks. Types without a JAX kernel here (the IQ, TQ and FP4 families) fall back to
`gguf.quants.dequantize` in numpy: slower, still exact.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from jax import lax

from ..errors import UnsupportedModelError

T = GGMLQuantizationType
Kernel = Callable[[jax.Array], jax.Array]


def _f16(b: jax.Array) -> jax.Array:
    """Two bytes per row -> float32 column [n, 1]."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[:, None]


def _shifts(*s: int) -> jax.Array:
    return jnp.array(s, dtype=jnp.uint8)


def _nibbles(qs: jax.Array) -> jax.Array:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high nibbles."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(qh: jax.Array, count: int) -> jax.Array:
    """[n, 4] little-endian bytes of a uint32 -> its low `count` bits as [n, count] uint8."""
    word = lax.bitcast_convert_type(qh, jnp.uint32)[:, None]
    return ((word >> jnp.arange(count, dtype=jnp.uint32)) & 1).astype(jnp.uint8)


def _f32(b: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(b.reshape(-1, 4), jnp.float32).reshape(b.shape[0], -1)


def _f16_values(b: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(b.reshape(-1, 2), jnp.float16).astype(jnp.float32).reshape(b.shape[0], -1)


def _bf16(b: jax.Array) -> jax.Array:
    half = lax.bitcast_convert_type(b.reshape(-1, 2), jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(half, jnp.float32).reshape(b.shape[0], -1)


# ---- quantized types as affine blocks ---------------------------------------------------------
# Every quantized type below is `value = scale * q (+ offset)` per group of `sub` values, with
# small integers q. `Affine` returns q as int8 `[n, groups, sub]` and float32 scale and offset
# `[n, groups]`, computed with the same float32 operations as gguf.quants; `_values` applies them
# in gguf.quants' order, so dequantization is bit for bit theirs, and the native weight layout
# (`convert.py`) keeps q, scale and offset on device and gets exactly the same values.

Affine = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]]


def _values(q: jax.Array, scale: jax.Array, offset: jax.Array | None) -> jax.Array:
    """scale * q (+ offset) as float32 `[n, groups * sub]` (a - b and a + (-b) round alike)."""
    v = scale[..., None] * q.astype(jnp.float32)
    if offset is not None:
        v = v + offset[..., None]
    return v.reshape(q.shape[0], -1)


def _i8(x: jax.Array) -> jax.Array:
    return x.astype(jnp.int8)


def _q4_0(b: jax.Array):
    return _i8(_nibbles(b[:, 2:]).astype(jnp.int8) - jnp.int8(8))[:, None], _f16(b[:, 0:2]), None


def _q4_1(b: jax.Array):
    return _i8(_nibbles(b[:, 4:]))[:, None], _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b: jax.Array):
    q = (_nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)).astype(jnp.int8) - jnp.int8(16)
    return q[:, None], _f16(b[:, 0:2]), None


def _q5_1(b: jax.Array):
    q = _i8(_nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4))
    return q[:, None], _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b: jax.Array):
    return lax.bitcast_convert_type(b[:, 2:], jnp.int8)[:, None], _f16(b[:, 0:2]), None


def _q2_k(b: jax.Array):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = d * (scales & 0x0F).astype(jnp.float32)
    ml = dmin * (scales >> 4).astype(jnp.float32)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    return _i8(q.reshape(n, 16, 16)), dl, -ml


def _q3_k(b: jax.Array):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, 0:8].reshape(n, 1, 8) >> _shifts(0, 4).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6).reshape(1, 4, 1)).reshape(n, 16)
    sc = (low & 0x0F) | ((high & 0x03) << 4)
    sc = (sc.astype(jnp.int8) - jnp.int8(32)).astype(jnp.float32)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)).reshape(n, 16, 16)
    qh = (qh & 1) ^ 1  # ggml subtracts 4 where the mask bit is clear
    return ql.astype(jnp.int8) - (qh << 2).astype(jnp.int8), d * sc, None


def _k_scale_min(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unpack the 12-byte, 6-bit scales and mins of Q4_K and Q5_K into [n, 8] each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_scaled(b: jax.Array, q: jax.Array):
    """Shared tail of Q4_K and Q5_K: per-32 scale and min for q [n, 8, 32]."""
    sc, mn = _k_scale_min(b[:, 4:16])
    d = _f16(b[:, 0:2]) * sc.astype(jnp.float32)
    dm = _f16(b[:, 2:4]) * mn.astype(jnp.float32)
    return _i8(q), d, -dm


def _q4_k(b: jax.Array):
    n = b.shape[0]
    q = (b[:, 16:144].reshape(n, 4, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)) & 0x0F
    return _k_scaled(b, q.reshape(n, 8, 32))


def _q5_k(b: jax.Array):
    n = b.shape[0]
    ql = (b[:, 48:176].reshape(n, 4, 1, 32) >> _shifts(0, 4).reshape(1, 1, 2, 1)).reshape(n, 8, 32) & 0x0F
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 8, 1)) & 1
    return _k_scaled(b, ql | (qh.reshape(n, 8, 32) << 4))


def _q6_k(b: jax.Array):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    ql = (ql.reshape(n, 2, 1, 64) >> _shifts(0, 4).reshape(1, 1, 2, 1)).reshape(n, 8, 32) & 0x0F
    qh = (qh.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6).reshape(1, 1, 4, 1)).reshape(n, 8, 32) & 0x03
    q = ((ql | (qh << 4)).astype(jnp.int8) - jnp.int8(32)).reshape(n, 16, 16)
    return q, _f16(b[:, 208:210]) * scales, None


AFFINE: dict[GGMLQuantizationType, Affine] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}


# ---- K-quants as two-level affine blocks ----------------------------------------------------------
# A K-quant's per-group scale is a small integer times a float16 per super-block of 256 values
# (`d * sc`), and so is its offset (`-(dmin * m)` = `(-dmin) * m`). `TwoLevel` returns q as
# `Affine` does, with scale and offset as int8 multipliers `[n, groups]` and their float16
# factors as float32 `[n, 1]`: their products are exactly `Affine`'s float32 scale and offset
# (a float16 times an integer of at most 8 bits has at most 19 significant bits). The native
# layout keeps them so, at about the file's size (`convert.py`).

TwoLevel = Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]]


def _two_level_q2_k(b: jax.Array):
    q, _, _ = _q2_k(b)
    scales = b[:, 0:16]
    return q, _i8(scales & 0x0F), _f16(b[:, 80:82]), _i8(scales >> 4), -_f16(b[:, 82:84])


def _two_level_k(b: jax.Array, q: jax.Array):
    """Q4_K and Q5_K: 6-bit scales and mins per 32 values, float16 d and dmin per block."""
    sc, mn = _k_scale_min(b[:, 4:16])
    return q, _i8(sc), _f16(b[:, 0:2]), _i8(mn), -_f16(b[:, 2:4])


def _two_level_q6_k(b: jax.Array):
    q, _, _ = _q6_k(b)
    return q, lax.bitcast_convert_type(b[:, 192:208], jnp.int8), _f16(b[:, 208:210]), None, None


TWO_LEVEL: dict[GGMLQuantizationType, TwoLevel] = {
    T.Q2_K: _two_level_q2_k,
    T.Q4_K: lambda b: _two_level_k(b, _q4_k(b)[0]),
    T.Q5_K: lambda b: _two_level_k(b, _q5_k(b)[0]),
    T.Q6_K: _two_level_q6_k,
}


def two_level_blocks(raw: jax.Array, ggml_type: GGMLQuantizationType) -> tuple[jax.Array, ...]:
    """Traceable: uint8 rows `[..., row_bytes]` of a K-quant -> `(q int8 [..., K], scale int8
    [..., K / sub], scale_d float32 [..., K / 256], offset int8 or None, offset_d float32 or None)`:
    `affine_blocks`' scale is `scale_d` (repeated per super-block) times `scale`, exactly."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    lead, blocks = raw.shape[:-1], raw.shape[-1] // size
    q, sc, d, m, dm = TWO_LEVEL[ggml_type](raw.reshape(-1, size))
    shape = lambda a: None if a is None else a.reshape(*lead, blocks * a.shape[-1])  # noqa: E731
    return q.reshape(*lead, blocks * block), shape(sc), shape(d), shape(m), shape(dm)


def _from_affine(affine: Affine) -> Kernel:
    return lambda b: _values(*affine(b))


KERNELS: dict[GGMLQuantizationType, Kernel] = {
    T.F32: _f32,
    T.F16: _f16_values,
    T.BF16: _bf16,
    **{t: _from_affine(a) for t, a in AFFINE.items()},
}


def supported_types() -> list[GGMLQuantizationType]:
    """Every type we can dequantize: the JAX kernels plus what `gguf.quants` handles."""
    out = []
    for t in GGML_QUANT_SIZES:
        if t in KERNELS:
            out.append(t)
            continue
        block, size = GGML_QUANT_SIZES[t]
        try:
            quants.dequantize(np.zeros(size, np.uint8), t)
            out.append(t)
        except (NotImplementedError, ValueError):
            pass
    return out


def dequantize_blocks(raw: jax.Array, ggml_type: GGMLQuantizationType) -> jax.Array:
    """Traceable: uint8 `[..., row_bytes]` -> float32 `[..., row_values]` for a JAX-kernel type."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    lead = raw.shape[:-1]
    values = KERNELS[ggml_type](raw.reshape(-1, size))
    return values.reshape(*lead, raw.shape[-1] // size * block)


def affine_blocks(raw: jax.Array, ggml_type: GGMLQuantizationType) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Traceable: uint8 rows `[..., row_bytes]` of a quantized type -> `(q int8 [..., K],
    scale float32 [..., K / sub], offset float32 [..., K / sub] or None)`, with every value equal
    to `scale * q (+ offset)` bit for bit as `dequantize_blocks` computes it."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    lead = raw.shape[:-1]
    q, scale, offset = AFFINE[ggml_type](raw.reshape(-1, size))
    groups = raw.shape[-1] // size * scale.shape[-1]
    q = q.reshape(*lead, raw.shape[-1] // size * block)
    scale = scale.reshape(*lead, groups)
    return q, scale, None if offset is None else offset.reshape(*lead, groups)


def dequantize_numpy(raw: np.ndarray, ggml_type: GGMLQuantizationType, what: str = "tensor") -> np.ndarray:
    """uint8 `[..., row_bytes]` -> float32 through `gguf.quants` (the fallback types)."""
    try:
        return quants.dequantize(np.ascontiguousarray(raw), ggml_type).astype(np.float32, copy=False)
    except NotImplementedError:
        raise UnsupportedModelError(f"{what}: tensor type {ggml_type.name} cannot be dequantized") from None


_jitted = jax.jit(dequantize_blocks, static_argnums=1)


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> jax.Array:
    """Dequantize uint8 rows `[..., row_bytes]` of any supported type to a float32 array."""
    if ggml_type in KERNELS:
        return _jitted(jnp.asarray(raw), ggml_type)
    return jnp.asarray(dequantize_numpy(raw, ggml_type))
