"""The native weight layout: GGUF's blocks kept on device as int8 (or packed 4-bit) q, scale
and offset.

It holds exactly the values the float32 layout holds (checked against gguf.quants, the numpy
oracle and the float32 path), it is the default, and batch-1 decoding multiplies without ever
building a float32 matrix (checked in the compiled program), with the CPU kernel or without.
"""

import json
import subprocess
import sys
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.generation import generate
from jaxllama import kernels
from jaxllama.gguf.blocks import Blocks, native_values, pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from jaxllama.gguf.convert import FIVE_BIT_QMIN, PACKED_QMIN, _shift_to_unsigned
from jaxllama.gguf.dequant import AFFINE, affine_blocks
from jaxllama.model import forward, forward_step, init_cache, xla_native_dense
from jaxllama.hlo import kernel_counts, unfused  # noqa: E402
from numpy_reference import reference_logits
from test_model import TOKENS, VARIANTS

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("t", list(AFFINE), ids=lambda t: t.name)
def test_affine_blocks_hold_gguf_quants_values(t):
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(int(t)).integers(0, 256, size=(3, 8 * size), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = gguf.quants.dequantize(raw, t)
    q, scale, offset = affine_blocks(jnp.asarray(raw), t)
    assert q.dtype == jnp.int8 and q.shape == (3, 8 * block) and scale.dtype == jnp.float32
    got = np.asarray(Blocks(q, scale, offset).values())
    finite = np.isfinite(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    if t in PACKED_QMIN:  # two values per byte, shifted to 0..15: still gguf.quants' values, bit for bit
        q, scale, offset = _shift_to_unsigned((q, scale, offset), PACKED_QMIN[t])
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        packed = Blocks(pack_nibbles(q), scale, offset)
        assert packed.q.dtype == jnp.uint8 and packed.q.shape == (3, 4 * block) and packed.bits == 4
        got = np.asarray(packed.values())
        assert np.array_equal(got[finite], want[finite])  # equal values; a zero may lose its sign (-0.0 -> 0.0)
        nonzero = finite & (want != 0)
        assert np.array_equal(got[nonzero].view(np.uint32), want[nonzero].view(np.uint32))
    if t in FIVE_BIT_QMIN:  # four bits per byte plus a plane of fifth bits: still gguf.quants' values
        q, scale, offset = _shift_to_unsigned((q, scale, offset), FIVE_BIT_QMIN[t])
        assert int(q.min()) >= 0 and int(q.max()) <= 31
        packed = Blocks(pack_nibbles(q & 15), scale, offset, qh=pack_bits(q >> 4))
        assert packed.q.shape == (3, 4 * block) and packed.qh.shape == (3, block) and packed.bits == 5
        got = np.asarray(packed.values())
        assert np.array_equal(got[finite], want[finite])
        nonzero = finite & (want != 0)
        assert np.array_equal(got[nonzero].view(np.uint32), want[nonzero].view(np.uint32))


def test_fifth_bit_planes_are_gguf_q5_0_order_and_round_trip():
    """Bit j of the little-endian uint32 of each 32 values is value j's, as in GGUF's Q5_0 `qh`."""
    bits = np.random.default_rng(1).integers(0, 2, size=(2, 64)).astype(np.uint8)
    p = np.asarray(pack_bits(jnp.asarray(bits)))
    assert p.shape == (2, 8) and p.dtype == np.uint8
    words = p.reshape(2, 2, 4).view("<u4")[..., 0]
    np.testing.assert_array_equal((words[..., None] >> np.arange(32)) & 1, bits.reshape(2, 2, 32))
    np.testing.assert_array_equal(np.asarray(unpack_bits(jnp.asarray(p))), bits)


def test_nibble_packing_is_gguf_order_and_round_trips():
    q = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(2, 3, 64)), jnp.int8)
    p = np.asarray(pack_nibbles(q))
    assert p.shape == (2, 3, 32)
    np.testing.assert_array_equal(p[..., :16] & 15, np.asarray(q[..., :16]))  # low nibbles: values 0..15
    np.testing.assert_array_equal(p[..., :16] >> 4, np.asarray(q[..., 16:32]))  # high: 16..31
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(jnp.asarray(p))), np.asarray(q))


@pytest.mark.parametrize("name", VARIANTS)
def test_native_equals_float32_and_the_numpy_oracle(tiny_factory, name):
    path = tiny_factory(VARIANTS[name])
    native, f32 = jaxllama.load(path), jaxllama.load(path, weights="float32")
    a, b = native.logits(TOKENS), f32.logits(TOKENS)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale  # the same values, summed in another order
    np.testing.assert_allclose(a, reference_logits(path, TOKENS), atol=4e-6 * scale, rtol=0)
    one = [native.logits(TOKENS[:1]), f32.logits(TOKENS[:1])]  # the fused one-row product
    assert np.abs(one[0] - one[1]).max() <= 1e-5 * scale


def test_quantized_tiny_model_is_native_and_smaller(tiny_factory):
    path = tiny_factory(VARIANTS["k-quants-mixed"])  # Q4_K with Q6_K, Q2_K, Q3_K, Q5_K layers
    native, f32 = jaxllama.load(path), jaxllama.load(path, weights="float32")
    assert native.weights == "native" and f32.weights == "float32"
    nbytes = lambda m: sum(x.nbytes for x in jax.tree.leaves(m.params["params"]["layers"]))  # noqa: E731
    assert nbytes(native) < 0.4 * nbytes(f32)
    v = native.params["params"]["layers"]["attn_v"]["kernel"]  # Q4_K, and Q2_K (groups of 16, offsets) in layer 1
    # K-quants keep GGUF's two levels: int8 multipliers per group, a float16 factor per 256 values
    assert isinstance(v, Blocks) and set(v.arrays()) == {"q", "scale", "scale_d", "offset", "offset_d"}
    assert v.group == 16 and v.scale.dtype == v.offset.dtype == jnp.int8 and v.scale_d.dtype == jnp.float16
    assert v.scale_d.shape[-1] == v.offset_d.shape[-1] == 1
    assert v.q.dtype == jnp.uint8 and v.bits == 4  # both 4-bit at most: packed two per byte
    assert native.params["params"]["layers"]["ffn_down"]["kernel"].bits == 8  # has Q6_K layers: int8


def test_native_blocks_are_the_gguf_bytes_and_the_float32_values(default_gguf, default_model):
    """GGUF keeps Q4_1's and Q8_0's scales (and Q4_1's minimums) as float16, so the native layout
    stores them as float16 too: its matrices take exactly the bytes of their GGUF tensors (as the
    gguf package's reader counts them), and hold bit for bit the float32 layout's values."""
    reader = gguf.GGUFReader(default_gguf)
    quantized = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type in (T.Q4_1, T.Q8_0))
    p = default_model.params["params"]
    leaves = [leaf.get("kernel") for leaf in p["layers"].values()] + [p["token_embd"]["embedding"]]
    native = [w for w in leaves if isinstance(w, Blocks)]
    assert len(native) == 8 and all(w.scale.dtype == jnp.float16 for w in native)
    assert all(w.offset.dtype == jnp.float16 for w in native if w.offset is not None)
    assert sum(x.nbytes for w in native for x in jax.tree.leaves(w)) == quantized
    f32 = jaxllama.load(default_gguf, weights="float32").params["params"]
    for name, leaf in p["layers"].items():
        if isinstance(leaf.get("kernel"), Blocks):
            got = np.asarray(leaf["kernel"].values())
            want = np.swapaxes(np.asarray(f32["layers"][name]["kernel"]), -1, -2)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_default_model_native_matches_float32(default_gguf, default_model):
    f32 = jaxllama.load(default_gguf, weights="float32")
    assert default_model.weights == "native"  # the default: fastest exact layout
    ids = default_model.tokenizer.encode("The history of the printing press begins in the fifteenth century")
    a, b = default_model.logits(ids), f32.logits(ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    g = [generate(m, [ids], 24, stop_at_eog=False).tokens[0] for m in (default_model, f32)]
    assert g[0] == g[1]


def test_one_row_product_never_builds_the_float32_matrix(default_model):
    """The compiled decode step holds no float32 copy of any layer matrix: on CPU the products
    are the kernel's custom calls on the stacked blocks, and without the kernel (and on a GPU,
    where this was seen on an H200) XLA fuses the dequantization into the matrix-vector products."""
    m = default_model
    assert m.params["params"]["layers"]["ffn_up"]["kernel"].packed  # Q4_1: packed
    cache = init_cache(m.config, 1, 64)
    step = jax.jit(forward_step, static_argnames=("config",))
    text = unfused(step.lower(m.params, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(3), jnp.zeros(1, jnp.int32),
                              m.config).compile().as_text())
    for shape in ("f32[576,576]", "f32[192,576]", "f32[1536,576]", "f32[576,1536]", "f32[49152,576]"):
        assert shape not in text, shape
    calls = kernel_counts(text)
    if jax.default_backend() == "cpu":
        assert kernels.available() and calls["jaxllama_gemv"] >= 8  # 7 per layer + head
        assert calls["jaxllama_attend"] == 1  # the attention, in the layer scan
    else:  # an accelerator: XLA's own fused products (the CPU kernels are never lowered there)
        assert calls["jaxllama_gemv"] == calls["jaxllama_attend"] == 0
    many = kernels.MAX_ROWS + 32
    prompt = unfused(jax.jit(forward, static_argnames="config").lower(
        m.params, jnp.zeros((1, many), jnp.int32), m.config).compile().as_text())
    if jax.default_backend() == "cpu":  # many rows: each layer's matrix built by the dequant kernel
        assert kernel_counts(prompt)["jaxllama_dequant"] >= 8  # 7 per layer + head
        # a prompt of any length, generation's prefill too, takes the prompt path (the kernel is
        # chosen by tokens per row, so a prompt's logits do not depend on its batch): the layer
        # matrices through the dequant kernel; the last rows' head, one token per row, through gemv
        short = unfused(jax.jit(forward_step, static_argnames=("config", "last_only")).lower(
            m.params, jnp.zeros((1, 4), jnp.int32), cache, jnp.int32(0), jnp.zeros(1, jnp.int32),
            m.config, last_only=True).compile().as_text())
        assert kernel_counts(short)["jaxllama_dequant"] >= 7 and kernel_counts(short)["jaxllama_gemv"] == 1
    # generation's prefill asks for each row's last logits only: B rows through the output matrix,
    # so no float32 vocabulary matrix is built; for every position (the control) it is, a slice of
    # `DEQUANT_BYTES` at a time (see test_large_matrices_are_multiplied_a_slice_at_a_time)
    import jaxllama.model as model

    per = 49152 if 49152 * 576 * 4 <= model.DEQUANT_BYTES else 49152 // 2  # whole, or two even slices
    for last_only, built in ((True, False), (False, True)):
        text = unfused(jax.jit(forward_step, static_argnames=("config", "last_only")).lower(
            m.params, jnp.zeros((1, many), jnp.int32), init_cache(m.config, 1, many), jnp.int32(0),
            jnp.zeros(1, jnp.int32), m.config, last_only=last_only).compile().as_text())
        assert (f"f32[{per},576]" in text) == built
    leaf = m.params["params"]["layers"]["ffn_up"]["kernel"].map(lambda v: v[0])  # [1536, 576], with offsets
    for rows, built in ((1, False), (2, True)):  # XLA's own form; the control: with two rows the matrix is built
        text = unfused(jax.jit(xla_native_dense).lower(jnp.zeros((rows, 576)), leaf).compile().as_text())
        assert ("f32[1536,576]" in text) == built


def test_long_rows_are_split_and_still_exact():
    """K above the fusion limit is cut into chunks; the result is the plain product's."""
    rng = np.random.default_rng(0)
    k = 5632  # TinyLlama's ffn_down
    leaf = Blocks(jnp.asarray(rng.integers(-8, 8, size=(64, k)), jnp.int8),
                  jnp.asarray(rng.random((64, k // 32)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(1, k)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(native_values(leaf), np.float64).T
    got = np.asarray(jax.jit(xla_native_dense)(x, leaf))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_saved_native_model_round_trips_and_converts(tiny_factory, tmp_path):
    path = tiny_factory(VARIANTS["gqa-q8_0-untied"])
    native = jaxllama.load(path)
    saved = native.save(tmp_path / "m.msgpack")
    again = jaxllama.load(saved)
    assert again.weights == "native"
    np.testing.assert_array_equal(again.logits(TOKENS), native.logits(TOKENS))
    as_float = jaxllama.load(saved, weights="float32")
    np.testing.assert_array_equal(as_float.logits(TOKENS), jaxllama.load(path, weights="float32").logits(TOKENS))


def test_bad_weights_name(tiny_gguf):
    with pytest.raises(jaxllama.InvalidInputError, match="weights: must be one of auto, native, float32, bfloat16"):
        jaxllama.load(tiny_gguf, weights="int4")


def test_large_matrices_are_multiplied_a_slice_at_a_time(default_gguf, default_model, monkeypatch):
    """A many-row product builds at most `DEQUANT_BYTES` of a float32 matrix at once: with the
    limit at 1 MiB every matrix of the default model (the 49,152-row output included, its last
    slice overlapping the one before) goes through slices, and the logits are the same: each
    output is the same dot product; XLA may block it otherwise, so the bound is float32
    reordering's (2 gamma_K per layer, see test_parallel.reorder_bound)."""
    import jaxllama.model as model
    from test_parallel import reorder_bound

    ids = default_model.tokenizer.encode("The history of the printing press begins in the fifteenth century, when")
    whole = default_model.logits(ids)
    monkeypatch.setattr(model, "DEQUANT_BYTES", 1 << 20)
    jax.clear_caches()
    text = jax.jit(model.forward, static_argnames=("config",)).lower(
        default_model.params, jnp.asarray([ids]), default_model.config).compile().as_text()
    assert "f32[49152,576]" not in unfused(text) and "f32[256,576]" in unfused(text)  # slices, not the matrix
    sliced = default_model.logits(ids)
    jax.clear_caches()
    assert np.abs(sliced - whole).max() <= reorder_bound(default_model.config) * np.abs(whole).max()
