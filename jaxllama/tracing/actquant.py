"""Emulate llama.cpp's CPU arithmetic: activation quantization in front of quantized matrix
products, and its fp16 GELU table.

On a quantized GGUF, llama.cpp's CPU backend converts each matmul's activations to the weight
type's "vec_dot" type before the dot product: Q8_1 for Q4_1/Q5_1, Q8_0 for Q4_0/Q5_0/Q8_0 (and
IQ4_NL), Q8_K for the K-quants and most IQ types, F16/BF16 for F16/BF16 weights. Applying the
same round trip to our activations (then multiplying by the exactly dequantized weights)
separates that quantization noise from real disagreement in a comparison. Rounding follows
the x86 SIMD paths llama.cpp runs here: scale 127/amax, round half to even, fp16 block scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import GGUFFormatError, UnsupportedModelError
from ..gguf.convert import MATRICES, matrix_tensors
from ..gguf.default_model import sha256_file
from ..gguf.reader import GGUFFile, read_gguf

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


def q8_1_sum_correction(x: jax.Array) -> jax.Array:
    """Per 32-block `[..., K/32]`: llama.cpp's stored block sum minus the sum our round trip implies.

    A Q4_1/Q5_1 dot product adds `m_w * s` per block, where `s = fp16(d * sum(q))` is rounded
    on its own (d unrounded); the round-tripped activations imply `fp16(d) * sum(q)` instead.
    Adding `correction @ block_mins` makes the emulated product llama.cpp's, up to float32
    summation order.
    """
    b = _blocks(x, 32)
    amax = jnp.max(jnp.abs(b), axis=-1)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    total = jnp.sum(jnp.round(b * inv[..., None]), axis=-1)
    d = amax / 127.0
    half = lambda v: v.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
    return half(d * total) - half(d) * total


def block_mins(raw: np.ndarray, ggml_type: T) -> np.ndarray:
    """The float16 block minimum `m` of Q4_1/Q5_1 rows `[out, row_bytes]` -> `[K/32, out]` float32.

    Both formats start a block with the fp16 scale `d` and then the fp16 minimum `m`.
    """
    size = GGML_QUANT_SIZES[ggml_type][1]
    blocks = raw.reshape(raw.shape[0], -1, size)
    return np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32).T


def with_block_mins(params: dict, f: GGUFFile, plan: tuple[tuple[str, str | None], ...], n_layer: int) -> dict:
    """A copy of `params` where each Q4_1/Q5_1 matrix leaf also holds `mins` (see q8_1_sum_correction)."""
    p = dict(params["params"])
    layers = dict(p["layers"])
    for short, kind in plan:
        if kind != "q8_1":
            continue
        names = matrix_tensors(short, n_layer, f.tensors)
        if short == "output":
            (name,) = names
            p["output"] = {**p.get("output", {}), "mins": jnp.asarray(block_mins(f.raw(name), f.tensors[name].ggml_type))}
            continue
        mins = np.stack([block_mins(f.raw(n), f.tensors[n].ggml_type) for n in names])
        layers[short] = {**layers[short], "mins": jnp.asarray(mins)}
    p["layers"] = layers
    return {"params": p}


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


def ggml_gelu(x: jax.Array) -> jax.Array:
    """GELU as ggml's CPU backend computes it (GGML_GELU_FP16): a table of fp16 values of the
    tanh formula, indexed by fp16(x); 0 at x <= -10 and x at x >= 10. Results are fp16-rounded,
    so they differ from the exact formula by up to ~5e-4 relative."""
    h = x.astype(jnp.float16).astype(jnp.float32)
    inner = np.float32(0.7978845608028654) * h * (1.0 + np.float32(0.044715) * h * h)
    table = (0.5 * h * (1.0 + jnp.tanh(inner))).astype(jnp.float16).astype(jnp.float32)
    return jnp.where(x <= -10.0, 0.0, jnp.where(x >= 10.0, x, table))


def act_quant_plan(tensor_types: Mapping[str, str], n_layer: int, activation: str = "silu"
                   ) -> tuple[tuple[str, str | None], ...]:
    """Static `(name, emulation)` pairs for `forward(act_quant=...)` from GGUF tensor types: per
    matrix the vec_dot type of its activations, and for a GeGLU model `("gelu", "ggml_f16")`
    (llama.cpp's CPU GELU table, see `ggml_gelu`).

    The output matrix is `output.weight`, or `token_embd.weight` when tied.
    """
    plan = []
    for short in MATRICES:
        names = matrix_tensors(short, n_layer, tensor_types)
        kinds = {VEC_DOT_TYPE.get(T[tensor_types[n]], "unknown") for n in names}
        if len(kinds) != 1 or "unknown" in kinds:
            raise UnsupportedModelError(
                f"cannot emulate activation quantization for {short}: weight types "
                f"{sorted({tensor_types[n] for n in names})}"
            )
        plan.append((short, kinds.pop()))
    if activation == "gelu_tanh":
        plan.append(("gelu", "ggml_f16"))
    return tuple(plan)


def with_act_quant(model: Any, enabled: bool = True) -> Any:
    """`model` (a `Model`), emulating (or not) llama.cpp's activation quantization for its weight types.

    For Q4_1/Q5_1 weights the block minimums are read from the source GGUF so the Q8_1 block-sum
    term can be reproduced too. A model reloaded from a saved file names its source GGUF and
    that file's SHA-256; the file is re-hashed first, so a changed or replaced file is refused.
    """
    if not enabled:
        return dataclasses.replace(model, act_quant=None)
    plan = act_quant_plan(model.tensor_types, model.config.n_layer, model.config.activation)
    params = model.params
    if any(kind == "q8_1" for _, kind in plan):
        if model.source_sha256 is not None:
            try:
                actual = sha256_file(model.source)
            except OSError as e:
                raise GGUFFormatError(f"{model.source}: source GGUF of the saved model cannot be read "
                                      f"({e.strerror or e})") from None
            if actual != model.source_sha256:
                raise GGUFFormatError(f"{model.source}: SHA-256 {actual[:12]}... differs from the saved model's "
                                      f"source {model.source_sha256[:12]}...; it is not the file the model came from")
        params = with_block_mins(params, read_gguf(model.source), plan, model.config.n_layer)
        if getattr(model, "mesh", None) is not None:  # the new `mins` leaves join the others on the mesh
            from ..parallel.rules import param_shardings

            params = jax.device_put(params, param_shardings(params, model.mesh))
    return dataclasses.replace(model, act_quant=plan, params=params)
