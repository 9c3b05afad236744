"""Long sequences: blockwise (online-softmax) attention equals the dense softmax, memory grows
linearly with length, and at 2,048 positions jaxllama still matches llama.cpp (full forward and
KV-cache decode)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.model import Visibility, attention, forward_hidden, forward_jit, forward_step, init_cache
from jaxllama.hlo import unfused  # noqa: E402
from numpy_reference import reference_logits
from tiny_models import TinySpec


class _Heads:  # the attention() config fields: 6 query heads reading 2 KV heads of size 8
    n_head, n_head_kv, n_group, head_dim = 6, 2, 3, 8
    query_scale = 1 / np.sqrt(8)


def _dense(q, k, v, q_slot, key_ok):
    """float64 softmax attention with an explicit [T, S] mask, per row and head."""
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, d))
    for i in range(b):
        mask = (np.arange(k.shape[1])[None, :] <= q_slot[i][:, None]) & key_ok[i][None, :]
        for head in range(h):
            s = q[i, :, head].astype(np.float64) @ k[i, :, head // 3].T.astype(np.float64) / np.sqrt(d)
            s = np.where(mask, s, -np.inf)
            with np.errstate(invalid="ignore"):  # a query that sees no key: NaN, never compared
                p = np.exp(s - s.max(axis=-1, keepdims=True))
                out[i, :, head] = (p / p.sum(axis=-1, keepdims=True)) @ v[i, :, head // 3]
    return out.reshape(b, t, h * d)


@pytest.mark.parametrize("t,s,block", [(37, 37, 16), (37, 37, 64), (50, 90, 16), (1, 90, 16), (48, 48, 16), (1, 100, 16), (40, 100, 16)])
def test_blockwise_attention_equals_dense_softmax(t, s, block):
    """Queries at the last t of s slots (a prefill or a decode step), rows left-padded by 0, 5, 20.
    Where s is no multiple of the balanced key block (37 or 100 by 16) the last block overlaps."""
    rng = np.random.default_rng(t * s + block)
    q = rng.normal(0, 2, size=(3, t, 6, 8)).astype(np.float32)
    k = rng.normal(0, 2, size=(3, s, 2, 8)).astype(np.float32)
    v = rng.normal(size=(3, s, 2, 8)).astype(np.float32)
    q_slot = np.broadcast_to(s - t + np.arange(t), (3, t)).copy()
    pad = np.array([0, 5, min(20, s - 1)])
    key_ok = np.arange(s)[None, :] >= pad[:, None]
    got = jax.jit(lambda *a: attention(*a[:3], Visibility(*a[3:]), _Heads, block=block))(q, k, v, q_slot, key_ok)
    seen = q_slot >= pad[:, None]  # a query that sees no key has no defined output
    assert np.abs(np.asarray(got) - _dense(q, k, v, q_slot, key_ok))[seen].max() < 1e-5


def test_attention_memory_grows_linearly_with_length(tiny_factory):
    """XLA's own buffer plan: temporaries grow by a constant per token, far below a [T, T] score array."""
    m = jaxllama.load(tiny_factory(TinySpec(context=8192)))
    fn = jax.jit(forward_hidden, static_argnames=("config",))
    temp = {t: fn.lower(m.params, jnp.zeros((1, t), jnp.int32), m.config).compile().memory_analysis().temp_size_in_bytes
            for t in (2048, 4096, 8192)}
    assert temp[8192] < 0.05 * m.config.n_head * 8192 * 8192 * 4  # one layer's dense scores would be 1 GiB
    assert temp[8192] - temp[4096] <= 2.5 * (temp[4096] - temp[2048])


def test_decode_step_updates_the_cache_in_place(tiny_factory):
    """A cache of 1,300 slots (no multiple of the key block): the compiled decode step writes
    the new keys into the donated cache and reads blocks of it; it never copies or pads it
    (each such copy is the whole layer-stacked cache, at every layer)."""
    m = jaxllama.load(tiny_factory(TinySpec(context=2048)))
    cache = init_cache(m.config, 1, 1300)
    step = jax.jit(lambda p, tok, cache, at: forward_step(p, tok, cache, at, jnp.zeros(1, jnp.int32), m.config),
                   donate_argnums=(2,))
    text = unfused(step.lower(m.params, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(700)).compile().as_text())
    lay, b, s, kv, d = cache["k"].shape
    made = re.findall(rf"= f32\[{lay},{b},(\d+),{kv},{d}\]\{{[^}}]*\}} ([\w-]+)\(", text)
    assert made and {int(n) for n, _ in made} == {s}  # no padded cache
    assert {op for _, op in made} <= {"parameter", "get-tuple-element", "fusion", "tuple"}, made
    assert sum(op == "fusion" for _, op in made) == 2  # k and v written once per layer, in the scan body


@pytest.fixture(scope="module")
def long_tiny(tiny_factory):
    path = tiny_factory(TinySpec(context=2048))
    tokens = np.random.default_rng(7).integers(0, 96, size=1310).tolist()
    return path, jaxllama.load(path), tokens, reference_logits(path, tokens)


def test_long_forward_matches_numpy_reference(long_tiny):
    """1,310 tokens: three query blocks (padded), key blocks skipped past the causal limit."""
    _, model, tokens, want = long_tiny
    got = model.logits(tokens)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max() / 30)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_long_cached_decode_matches_numpy_reference(long_tiny):
    """Prefill 1,300 tokens (one row left-padded by 700 slots), then decode 10 steps at slots 1,300+."""
    _, model, tokens, want = long_tiny
    c, pad = model.config, np.array([0, 700], np.int32)
    cache = init_cache(c, 2, 2048)
    prompt = np.zeros((2, 1300), np.int32)
    prompt[0], prompt[1, 700:] = tokens[:1300], tokens[:600]
    step = jax.jit(forward_step, static_argnames=("config",))
    logits, cache = step(model.params, jnp.asarray(prompt), cache, jnp.int32(0), jnp.asarray(pad), c)
    assert np.abs(np.asarray(logits[0, -1]) - want[1299]).max() <= 1e-3
    assert np.abs(np.asarray(logits[1, -1]) - reference_logits(long_tiny[0], tokens[:600])[-1]).max() <= 1e-3
    for i in range(1300, 1310):
        logits, cache = step(model.params, jnp.asarray([[tokens[i]], [0]], np.int32), cache, jnp.int32(i),
                             jnp.asarray(pad), c)
        assert np.abs(np.asarray(logits[0, 0]) - want[i]).max() <= 1e-3


@pytest.mark.llamacpp
def test_2048_positions_match_llamacpp_full_forward_and_decode(f32_gguf):
    """F32 re-export, F32 KV cache, flash attention off; a real text of 2,048 tokens (RoPE far out,
    attention over a long context): the full forward, then KV-cache decode of the last 8 positions."""
    from jaxllama.reference import LlamaCpp
    from texts import licence_text

    model = jaxllama.load(f32_gguf)
    tokens = model.tokenizer.encode(licence_text(), add_special=False)[:2048]
    assert len(tokens) == 2048
    ref = LlamaCpp(f32_gguf, n_ctx=2048)
    want = ref.logits(tokens)
    ref.close()
    got = np.asarray(forward_jit(model.params, jnp.asarray([tokens]), model.config))[0]
    err = np.abs(got - want).max(axis=-1)  # per position; logits span about +-30
    assert err.max() <= 5e-3, f"max |dlogit| {err.max():.2e} at position {err.argmax()}"  # measured 1.9e-3
    assert np.median(err) <= 1e-3
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.999
    del got
    c = model.config
    step = jax.jit(forward_step, static_argnames=("config",))
    pad = jnp.zeros(1, jnp.int32)
    logits, cache = step(model.params, jnp.asarray([tokens[:2040]]), init_cache(c, 1, 2048), jnp.int32(0), pad, c)
    assert np.abs(np.asarray(logits[0, -1]) - want[2039]).max() <= 5e-3
    for i in range(2040, 2048):
        logits, cache = step(model.params, jnp.asarray([[tokens[i]]]), cache, jnp.int32(i), pad, c)
        assert np.abs(np.asarray(logits[0, 0]) - want[i]).max() <= 5e-3
