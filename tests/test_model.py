"""The forward on tiny random models: against an independent numpy forward, and its invariants
(scan == unrolled, jit == no jit, padded batch == single rows, compile size independent of depth)."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.model import forward, forward_jit
from numpy_reference import reference_logits
from tiny_models import TinySpec

T = gguf.GGMLQuantizationType
TOKENS = [3, 17, 5, 90, 44, 2, 8, 8, 61, 0, 33, 12, 70, 71, 72, 1]

VARIANTS = {
    "mha-f32": TinySpec(n_head_kv=4),
    "gqa-q8_0-untied": TinySpec(matrix_type=T.Q8_0, embd_type=T.Q8_0, tied=False),
    "mqa-q4_0-rope_freqs": TinySpec(n_head_kv=1, matrix_type=T.Q4_0, rope_freqs=True),
    "gqa-q4_1-linear-rope": TinySpec(matrix_type=T.Q4_1, rope_scale=4.0, rope_base=500.0),
    "q5_0-with-a-q5_1-layer": TinySpec(matrix_type=T.Q5_0, overrides={("ffn_up", 1): T.Q5_1}),
    "f16-bf16-embd": TinySpec(matrix_type=T.F16, embd_type=T.BF16, n_layer=3),
    "k-quants-mixed": TinySpec(
        d_model=256, d_ff=256, n_head=4, n_head_kv=2, matrix_type=T.Q4_K,
        overrides={("ffn_down", 0): T.Q6_K, ("attn_v", 1): T.Q2_K, ("attn_k", 0): T.Q3_K, ("ffn_up", 1): T.Q5_K},
    ),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_numpy_reference(tiny_factory, name):
    path = tiny_factory(VARIANTS[name])
    ref = reference_logits(path, TOKENS)
    out = jaxllama.load(path).logits(TOKENS)
    assert out.shape == (len(TOKENS), VARIANTS[name].vocab)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=4e-6 * scale, rtol=0)
    assert np.array_equal(out.argmax(-1), ref.argmax(-1))


def test_config_read_from_metadata(tiny_factory):
    spec = VARIANTS["gqa-q4_1-linear-rope"]
    c = jaxllama.load(tiny_factory(spec)).config
    assert (c.n_layer, c.d_model, c.n_head, c.n_head_kv, c.head_dim, c.d_ff) == (2, 64, 4, 2, 16, 128)
    assert (c.rope_base, c.rope_scale, c.vocab_size, c.context_length) == (500.0, 4.0, 96, 256)
    assert c.tied_output and not c.has_rope_freqs


def test_param_pytree_layout(tiny_factory):
    m = jaxllama.load(tiny_factory(VARIANTS["gqa-q8_0-untied"]), weights="float32")
    shapes = jax.tree.map(lambda a: a.shape, m.params)
    L, D, F, V = 2, 64, 128, 96
    assert shapes["params"]["layers"]["attn_q"]["kernel"] == (L, D, 64)
    assert shapes["params"]["layers"]["attn_k"]["kernel"] == (L, D, 32)
    assert shapes["params"]["layers"]["ffn_down"]["kernel"] == (L, F, D)
    assert shapes["params"]["layers"]["attn_norm"]["scale"] == (L, D)
    assert shapes["params"]["token_embd"]["embedding"] == (V, D)
    assert shapes["params"]["output"]["kernel"] == (D, V)


def test_scan_equals_unrolled_and_jit_equals_eager(tiny_factory):
    m = jaxllama.load(tiny_factory(VARIANTS["f16-bf16-embd"]))
    tokens = jnp.asarray([TOKENS])
    scanned = np.asarray(forward_jit(m.params, tokens, m.config))
    unrolled = np.asarray(forward_jit(m.params, tokens, m.config, scan_layers=False))
    with jax.disable_jit():
        eager = np.asarray(forward(m.params, tokens, m.config))
    tol = 2e-6 * np.abs(scanned).max()  # a few float32 ulps: only fusion and op order differ
    np.testing.assert_allclose(unrolled, scanned, atol=tol, rtol=0)
    np.testing.assert_allclose(eager, scanned, atol=tol, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_single_rows(tiny_factory, side):
    m = jaxllama.load(tiny_factory(VARIANTS["gqa-q8_0-untied"]))
    rows = [TOKENS, TOKENS[3:9], TOKENS[:1], TOKENS[5:]]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, sl], valid[i, sl] = r, True
    out = np.asarray(forward_jit(m.params, jnp.asarray(tokens), m.config, jnp.asarray(valid)))
    assert np.isfinite(out).all()  # padding never produces NaN, even in fully padded rows
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        np.testing.assert_allclose(out[i, sl], m.logits(r), atol=1e-5, rtol=0)


def test_logits_batch_api(tiny_factory):
    m = jaxllama.load(tiny_factory())
    rows = [TOKENS, TOKENS[4:7]]
    for got, r in zip(m.logits_batch(rows), rows):
        np.testing.assert_allclose(got, m.logits(r), atol=1e-5, rtol=0)


def _lowered_text(config, scan_layers):
    """StableHLO of the forward for a model of this config, lowered from shapes alone."""
    spec = jax.eval_shape(lambda: _zero_params(config))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.jit(forward, static_argnames=("config", "scan_layers")).lower(
        spec, tokens, config, scan_layers=scan_layers
    ).as_text()


def _zero_params(c):
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    L, D, F = c.n_layer, c.d_model, c.d_ff
    z = jnp.zeros
    layers = {
        "attn_norm": {"scale": z((L, D))}, "ffn_norm": {"scale": z((L, D))},
        "attn_q": {"kernel": z((L, D, q))}, "attn_k": {"kernel": z((L, D, kv))},
        "attn_v": {"kernel": z((L, D, kv))}, "attn_output": {"kernel": z((L, q, D))},
        "ffn_gate": {"kernel": z((L, D, F))}, "ffn_up": {"kernel": z((L, D, F))},
        "ffn_down": {"kernel": z((L, F, D))},
    }
    return {"params": {"token_embd": {"embedding": z((c.vocab_size, D))}, "layers": layers,
                       "output_norm": {"scale": z((D,))}}}


def test_scanned_program_size_does_not_grow_with_depth(tiny_factory):
    import dataclasses

    c = jaxllama.load(tiny_factory()).config
    two, thirty = (dataclasses.replace(c, n_layer=n) for n in (2, 30))
    dots = lambda text: text.count("dot_general")  # noqa: E731
    assert dots(_lowered_text(two, True)) == dots(_lowered_text(thirty, True))
    assert dots(_lowered_text(thirty, False)) > 10 * dots(_lowered_text(two, True)) / 2
