"""Our JAX dequantizers against `gguf.quants`, bit for bit."""

import warnings

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.gguf.dequant import KERNELS, dequantize, supported_types
from tiny_models import TinySpec

T = gguf.GGMLQuantizationType
REQUIRED = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _oracle(raw, t):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN/inf from random scale bytes
        return gguf.quants.dequantize(raw, t)


@pytest.mark.parametrize("name", REQUIRED)
def test_jax_kernel_bit_exact_on_random_blocks(name):
    t = T[name]
    assert t in KERNELS
    block, size = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(list(T).index(t))
    raw = rng.integers(0, 256, size=(5, 64 * size), dtype=np.uint8)  # every bit pattern, NaN scales too
    ref = _oracle(raw, t)
    out = np.asarray(dequantize(raw, t))
    assert out.shape == ref.shape == (5, 64 * block)
    assert out.dtype == np.float32
    finite = np.isfinite(ref)
    assert np.array_equal(out[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    assert np.array_equal(out[np.isinf(ref)], ref[np.isinf(ref)])


def test_every_gguf_dequantizable_type_is_supported():
    names = {t.name for t in supported_types()}
    assert set(REQUIRED) <= names
    assert {"IQ4_NL", "IQ2_XXS", "TQ1_0"} <= names


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "TQ2_0", "MXFP4"])
def test_fallback_types_match_gguf(name):
    t = T[name]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(7).integers(0, 256, size=(3, 4 * size), dtype=np.uint8)
    ref = _oracle(raw, t)
    out = np.asarray(dequantize(raw, t))
    np.testing.assert_array_equal(out, ref)


def test_default_model_params_equal_gguf_dequantization(default_gguf):
    """Every tensor of the default model, stacked/transposed into the pytree, equals gguf.quants."""
    r = gguf.GGUFReader(default_gguf)
    p = jaxllama.load(default_gguf, weights="float32").params["params"]
    for t in r.tensors:
        ref = _oracle(t.data, t.tensor_type)
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            ours = p["token_embd"]["embedding"]
        elif name == "output_norm":
            ours = p["output_norm"]["scale"]
        else:
            _, layer, short = name.split(".")
            leaf = p["layers"][short]
            ours = leaf["scale"][int(layer)] if "scale" in leaf else leaf["kernel"][int(layer)].T
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=t.name)


def test_bfloat16_params_are_rounded_float32(tiny_factory):
    path = tiny_factory(TinySpec(matrix_type=T.Q8_0))
    f32 = jaxllama.load(path, weights="float32").params["params"]
    bf16 = jaxllama.load(path, dtype="bfloat16").params["params"]
    k32, k16 = f32["layers"]["ffn_up"]["kernel"], bf16["layers"]["ffn_up"]["kernel"]
    assert k16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(k16), np.asarray(k32.astype(jnp.bfloat16)))
    assert bf16["layers"]["attn_norm"]["scale"].dtype == jnp.float32  # norms stay float32
