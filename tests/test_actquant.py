"""Emulated activation quantization against llama.cpp's own products (live) and the Q8 formulas."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.tracing.actquant import block_mins, fake_quant
from jaxllama.reference import capture
from jaxllama.model import layer_params, project

T = gguf.GGMLQuantizationType


def q8_1_reference(x, raw):
    """llama.cpp's Q4_1 x Q8_1 dot product written out in numpy (ggml-cpu x86 quants.c):
    per 32-block, fp16(d_w) * fp16(d_x) * sum(q_w q_x) + fp16(m_w) * fp16(d_x_f32 * sum(q_x))."""
    out, nb = raw.shape[0], raw.shape[1] // 20
    blk = raw.reshape(out, nb, 20)
    dw = blk[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    mw = blk[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    qw = np.concatenate([blk[:, :, 4:] & 15, blk[:, :, 4:] >> 4], -1).astype(np.int64)
    xb = x.reshape(x.shape[0], nb, 32).astype(np.float32)
    amax = np.abs(xb).max(-1)
    d = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inv[..., None]).astype(np.int64)
    dx = d.astype(np.float16).astype(np.float64)
    s = (d * qx.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)
    sumi = np.einsum("obk,tbk->tob", qw, qx)
    return ((dw[None] * dx[:, None]) * sumi + mw[None] * s[:, None]).sum(-1)


@pytest.mark.llamacpp
def test_q8_1_formula_reproduces_llamacpp_and_so_does_project(default_gguf, default_model):
    """Feed llama.cpp's own attn_norm-0 to both: its Vcur-0 must come out (F32 summation order aside)."""
    toks = default_model.tokenizer.encode("The history of the printing press begins in the fifteenth century.")
    tensors, _, _ = capture(default_gguf, toks, keep=lambda n: n in ("attn_norm-0", "Vcur-0"))
    x = tensors["attn_norm-0"].reshape(len(toks), -1)
    want = tensors["Vcur-0"].reshape(len(toks), -1)
    raw = jaxllama.read_gguf(default_gguf).raw("blk.0.attn_v.weight")
    ref = q8_1_reference(x, raw)
    assert np.linalg.norm(ref - want) / np.linalg.norm(want) < 2e-6
    emulated = default_model.with_act_quant(True)
    leaf = layer_params(emulated.params["params"]["layers"], 0)["attn_v"]
    got = np.asarray(project(jnp.asarray(x), leaf, "q8_1"))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6
    plain = np.asarray(project(jnp.asarray(x), leaf, None))
    assert np.linalg.norm(plain - want) / np.linalg.norm(want) > 1e-3  # without emulation: the gap


def test_block_mins_read_from_q4_1_blocks():
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, T.Q4_1)
    mins = block_mins(raw, T.Q4_1)
    deq = gguf.quants.dequantize(raw, T.Q4_1).reshape(8, 2, 32)
    np.testing.assert_array_equal(mins, deq.min(-1).T)  # the minimum is stored exactly (q = 0)


def test_q8_0_round_trip_formula():
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    xb = x.reshape(3, 2, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    want = np.rint(xb * (np.float32(127) / amax)) * (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(fake_quant(jnp.asarray(x), "q8_0")), want.reshape(3, 64))


def test_q8_k_round_trip_formula():
    x = np.random.default_rng(2).normal(size=(2, 256)).astype(np.float32)
    peak = x[np.arange(2), np.abs(x).argmax(-1)][:, None]
    iscale = np.float32(-127) / peak
    want = np.minimum(np.rint(iscale * x), 127) * (np.float32(1) / iscale)
    np.testing.assert_array_equal(np.asarray(fake_quant(jnp.asarray(x), "q8_k")), want)
