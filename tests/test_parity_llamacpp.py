"""Live parity with llama.cpp (llama-cpp-python). Never skipped: a missing llama.cpp fails.

Bit-close settings: every tensor dequantized to F32 (by gguf.quants), F32 KV cache, flash
attention off. On the Q4_1 file llama.cpp quantizes activations to Q8_1 before each dot
product, so only agreement in distribution is required there.
"""

import jax
import numpy as np
import pytest

import jaxllama
from jaxllama.reference import LlamaCpp
from texts import TEXTS
from tiny_models import TinySpec

pytestmark = pytest.mark.llamacpp  # runs llama.cpp in-process (see reference_gate)


def _kl(p_logits, q_logits):
    lp = np.asarray(jax.nn.log_softmax(p_logits.astype(np.float64), axis=-1))
    lq = np.asarray(jax.nn.log_softmax(q_logits.astype(np.float64), axis=-1))
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


@pytest.fixture(scope="module")
def ref_f32(f32_gguf):
    ref = LlamaCpp(f32_gguf, n_ctx=512)
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def model_f32(f32_gguf):
    return jaxllama.load(f32_gguf)


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_f32_logits_match_llamacpp(ref_f32, model_f32, index):
    tokens = ref_f32.tokenize(TEXTS[index])
    assert len(tokens) >= 100
    want = ref_f32.logits(tokens)
    got = model_f32.logits(tokens)
    assert got.shape == want.shape == (len(tokens), 49152)
    assert np.abs(got - want).max() <= 1e-3
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_f32_batch_with_padding_matches_llamacpp(ref_f32, model_f32):
    rows = [ref_f32.tokenize(t) for t in TEXTS]
    for got, tokens in zip(model_f32.logits_batch(rows), rows):
        assert np.abs(got - ref_f32.logits(tokens)).max() <= 1e-3


def test_q4_1_logits_agree_in_distribution(default_gguf, default_model):
    ref = LlamaCpp(default_gguf, n_ctx=512)
    agree, kls = [], []
    for text in TEXTS:
        tokens = ref.tokenize(text)
        want, got = ref.logits(tokens), default_model.logits(tokens)
        agree.append(np.mean(got.argmax(-1) == want.argmax(-1)))
        kls.append(_kl(want, got))
    ref.close()
    assert np.mean(agree) >= 0.90
    assert np.mean(np.concatenate(kls)) <= 0.02


TINY = {
    "rope_freqs": TinySpec(rope_freqs=True),
    "linear-rope-untied": TinySpec(rope_scale=4.0, tied=False),
    "mqa-3-layers": TinySpec(n_head_kv=1, n_layer=3),
    "mha": TinySpec(n_head_kv=4, rope_base=100.0),
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_f32_models_match_llamacpp(tiny_factory, name):
    """Confirms our reading of rope_freqs, linear scaling, GQA/MQA/MHA and untied output."""
    path = tiny_factory(TINY[name])
    tokens = list(np.random.default_rng(3).integers(0, 96, size=120))
    ref = LlamaCpp(path, n_ctx=128)
    want = ref.logits(tokens)
    ref.close()
    got = jaxllama.load(path).logits(tokens)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max() / 30)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
