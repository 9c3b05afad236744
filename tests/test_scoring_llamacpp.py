"""Perplexity and KL against llama.cpp (llama-cpp-python), on a real text of several thousand tokens.

The expected perplexity is llama-perplexity's method applied to llama.cpp's own logits, written out
here: llama.cpp's tokenizer, one chunk at a time from an empty cache (`LlamaCpp.logits`), float64
log-softmax in numpy. jaxllama must land within 0.1% on the F32 re-export (bit-close settings) and
within 0.5% on the Q4_1 file (where llama.cpp also quantizes activations).
"""

import numpy as np
import pytest

import jaxllama
from jaxllama.reference import LlamaCpp
from jaxllama.scoring import LlamaCppBase, kl_divergence, llamacpp_perplexity, perplexity
from texts import licence_text

pytestmark = pytest.mark.llamacpp  # runs llama.cpp in-process (see reference_gate)


def llamacpp_method(path, text, ctx, chunks):
    """llama-perplexity's perplexity from llama.cpp's logits; also the per-token NLL `[chunks, ctx/2 - 1]`."""
    ref = LlamaCpp(path, n_ctx=ctx)
    tokens = ref.tokenize(text, add_special=True)
    assert not ref.lib.llama_vocab_get_add_bos(ref.vocab)  # SmolLM2: no BOS, first tokens stay
    nll = []
    for i in range(min(chunks, len(tokens) // ctx)):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        x = ref.logits(chunk).astype(np.float64)[ctx // 2: ctx - 1]
        lp = x - x.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll.append(-lp[np.arange(len(lp)), chunk[ctx // 2 + 1:]])
    ref.close()
    nll = np.asarray(nll)
    return float(np.exp(nll.mean())), nll, len(tokens)


@pytest.fixture(scope="module")
def text():
    return licence_text()


@pytest.fixture(scope="module")
def model_f32(f32_gguf):
    return jaxllama.load(f32_gguf)


def test_perplexity_f32_ctx128_within_0_1_percent(f32_gguf, model_f32, text):
    want, want_nll, n_tokens = llamacpp_method(f32_gguf, text, 128, chunks=24)
    assert n_tokens > 7000 and n_tokens % 128  # the whole licence, not a multiple of ctx
    got = perplexity(model_f32, text, ctx=128, chunks=24)
    assert got.n_chunks == 24 and got.nll.shape == want_nll.shape == (24, 63)  # 3,072 tokens run
    assert abs(got.ppl / want - 1) <= 1e-3  # measured 1e-7
    assert np.abs(got.nll - want_nll).max() <= 1e-2


def test_perplexity_q4_1_ctx128_within_0_5_percent(default_gguf, default_model, text):
    want, _, _ = llamacpp_method(default_gguf, text, 128, chunks=16)
    got = perplexity(default_model, text, ctx=128, chunks=16)
    assert abs(got.ppl / want - 1) <= 5e-3  # measured 4e-4: llama.cpp's Q8_1 activations cost little here


def test_perplexity_f32_ctx1024(f32_gguf, model_f32, text):
    want, _, _ = llamacpp_method(f32_gguf, text, 1024, chunks=2)
    got = perplexity(model_f32, text, ctx=1024, chunks=2)
    assert got.n_tokens == 2048 and got.nll.shape == (2, 511)
    assert abs(got.ppl / want - 1) <= 1e-3  # measured 1e-6


def test_llamacpp_perplexity_is_the_same_method(f32_gguf, text):
    """The library's llama.cpp path (`perplexity --llamacpp`, several chunks per decode, 63 scored
    positions per chunk taken to float64 in slabs of 32) gives the same."""
    want, want_nll, _ = llamacpp_method(f32_gguf, text, 128, chunks=6)
    got = llamacpp_perplexity(f32_gguf, text, ctx=128, chunks=6, n_seq=4)
    assert got.nll.shape == want_nll.shape == (6, 63) and abs(got.ppl / want - 1) <= 1e-5
    assert np.abs(got.nll - want_nll).max() <= 1e-9  # the same float64 arithmetic on the same logits


def test_kl_against_llamacpp_on_the_same_file(f32_gguf, model_f32, text):
    """jaxllama vs llama.cpp as the base run: the project's own fidelity figure (F32, bit-close)."""
    r = kl_divergence(LlamaCppBase(f32_gguf), model_f32, text, ctx=128, chunks=3)
    assert r.base["kind"] == "llama.cpp" and r.n_chunks == 3
    assert abs(r.kld_mean) <= 1e-5 and r.kld_percentiles["max"] <= 1e-4
    assert r.same_top_rate >= 0.99 and abs(r.ppl_ratio - 1) <= 1e-4
