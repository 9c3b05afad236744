"""Emulate llama.cpp's activation quantization in front of quantized matrix products.

On a quantized GGUF, llama.cpp's CPU backend converts each matmul's activations to the weight
type's "vec_dot" type before the dot product: Q8_1 for Q4_1/Q5_1, Q8_0 for Q4_0/Q5_0/Q8_0 (and
IQ4_NL), Q8_K for the K-quants and most IQ types, F16/BF16 for F16/BF16 weights. Applying the
same round trip to our activations (then multiplying by the exactly dequantized weights)
separates that quantization noise from real disagreement in a comparison. Rounding follows
the x86 SIMD paths llama.cpp runs here: scale 127/amax, round half to even, fp16 block scale.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType as T

from .errors import UnsupportedModelError

VEC_DOT_TYPE: dict[T, str | None] = {
    T.F32: None,
    T.F16: "f16",
    T.BF16: "bf16",
    T.Q4_0: "q8_0",
    T.Q5_0: "q8_0",
    T.Q8_0: "q8_0",
    T.IQ4_NL: "q8_0",
    T.MXFP4: "q8_0",
    T.Q4_1: "q8_1",
    T.Q5_1: "q8_1",
}
K_FAMILY = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS,
            T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_XS, T.TQ1_0, T.TQ2_0)
VEC_DOT_TYPE.update({t: "q8_k" for t in K_FAMILY})

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")


def _blocks(x: jax.Array, size: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _q8_32(x: jax.Array) -> jax.Array:
    """Q8_0 / Q8_1 round trip (identical values; Q8_1 also stores a block sum)."""
    b = _blocks(x, 32)
    amax = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.round(b * inv)
    d = (amax / 127.0).astype(jnp.float16).astype(jnp.float32)
    return (q * d).reshape(x.shape)


def _q8_k(x: jax.Array) -> jax.Array:
    """Q8_K round trip: blocks of 256, scale from the signed value of largest magnitude."""
    b = _blocks(x, 256)
    idx = jnp.argmax(jnp.abs(b), axis=-1, keepdims=True)
    peak = jnp.take_along_axis(b, idx, axis=-1)
    nonzero = peak != 0
    iscale = jnp.where(nonzero, -127.0 / jnp.where(nonzero, peak, 1.0), 0.0)
    q = jnp.minimum(jnp.round(iscale * b), 127.0)
    d = jnp.where(nonzero, 1.0 / jnp.where(nonzero, iscale, 1.0), 0.0)
    return (q * d).reshape(x.shape)


def fake_quant(x: jax.Array, kind: str | None) -> jax.Array:
    """Round-trip float32 activations `x[..., K]` through llama.cpp's vec_dot type `kind`."""
    if kind is None:
        return x
    if kind in ("q8_0", "q8_1"):
        return _q8_32(x)
    if kind == "q8_k":
        return _q8_k(x)
    if kind == "f16":
        return x.astype(jnp.float16).astype(jnp.float32)
    if kind == "bf16":
        return x.astype(jnp.bfloat16).astype(jnp.float32)
    raise ValueError(f"unknown activation type {kind!r}")


def act_quant_plan(tensor_types: Mapping[str, str], n_layer: int) -> tuple[tuple[str, str | None], ...]:
    """Static `(matrix, vec_dot type)` pairs for `forward(act_quant=...)` from GGUF tensor types.

    The output matrix is `output.weight`, or `token_embd.weight` when tied.
    """
    plan = []
    for short in MATRICES:
        if short == "output":
            names = ["output.weight" if "output.weight" in tensor_types else "token_embd.weight"]
        else:
            names = [f"blk.{i}.{short}.weight" for i in range(n_layer)]
        kinds = {VEC_DOT_TYPE.get(T[tensor_types[n]], "unknown") for n in names}
        if len(kinds) != 1 or "unknown" in kinds:
            raise UnsupportedModelError(
                f"cannot emulate activation quantization for {short}: weight types "
                f"{sorted({tensor_types[n] for n in names})}"
            )
        plan.append((short, kinds.pop()))
    return tuple(plan)
