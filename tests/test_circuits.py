"""The logit lens, attention patterns and head scores, patching sweeps: against float64 numpy
references on tiny random models (tests/numpy_reference.py), and their own invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.analysis import attention_patterns, head_scores, lens_bound, lens_chunk, lens_stats, logit_lens, patch_sweep
from jaxllama.analysis.attention import induction_tokens, weights_from_qk
from jaxllama.errors import InvalidInputError
from jaxllama.model import forward_capture
from jaxllama.tracing import interventions
from jaxllama.tracing.probes import Intervention, ProbeSpec
from numpy_reference import reference_logits
from test_model import TOKENS, VARIANTS
from test_parallel import reorder_bound
from tiny_models import TinySpec

GEMMA = TinySpec(architecture="gemma3", n_layer=6, head_dim=32, sliding_window=4)
MODELS = {"gqa-q8_0-untied": VARIANTS["gqa-q8_0-untied"], "mha-f32": VARIANTS["mha-f32"], "gemma3-window": GEMMA}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", MODELS)
def test_lens_is_the_final_norm_and_output_applied_to_each_layer(tiny_factory, name):
    path = tiny_factory(MODELS[name])
    keep: dict = {}
    final = reference_logits(path, TOKENS, keep)
    model = jaxllama.load(path)
    lens = logit_lens(model, TOKENS, k=3)
    probs = np.stack([_softmax(keep["head"](x)) for x in keep["l_out"]])  # [L, T, V], float64
    logp = np.log(probs)
    assert lens.layers == list(range(model.config.n_layer)) and lens.probes == ["l_out"] * model.config.n_layer
    targets = np.array(TOKENS[1:] + [-1])
    assert lens.target_ids == targets.tolist()
    t = np.arange(len(TOKENS) - 1)
    np.testing.assert_allclose(lens.target_prob[:, :-1], probs[:, t, targets[:-1]], rtol=1e-5, atol=1e-7)
    assert np.isnan(lens.target_prob[:, -1]).all() and (lens.target_rank[:, -1] == -1).all()
    np.testing.assert_allclose(lens.entropy, -(probs * logp).sum(-1), rtol=1e-5, atol=1e-6)
    kl = (probs[-1][None] * (logp[-1][None] - logp)).sum(-1)
    np.testing.assert_allclose(lens.kl_to_final, kl, rtol=1e-4, atol=1e-6)
    assert np.abs(lens.kl_to_final[-1]).max() <= 1e-6  # the last layer's lens is the model's distribution
    np.testing.assert_allclose(lens.top_probs, -np.sort(-probs, axis=-1)[..., :3], rtol=1e-5, atol=1e-7)
    ranks = (probs[:, t, :] > probs[:, t, targets[:-1]][..., None]).sum(-1)
    assert np.abs(lens.target_rank[:, :-1] - ranks).max() <= 0 or np.mean(lens.target_rank[:, :-1] == ranks) > 0.99
    np.testing.assert_allclose(_softmax(final), probs[-1], atol=1e-6)


def test_lens_of_ffn_inp_and_a_fixed_target(tiny_gguf):
    model = jaxllama.load(tiny_gguf)
    keep: dict = {}
    reference_logits(tiny_gguf, TOKENS, keep)
    lens = logit_lens(model, TOKENS, target=7, probes=("ffn_inp",))
    assert lens.probes == ["ffn_inp"] * model.config.n_layer and lens.target_ids == [7] * len(TOKENS)
    want = np.stack([_softmax(keep["head"](x))[:, 7] for x in keep["ffn_inp"]])
    np.testing.assert_allclose(lens.target_prob, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(InvalidInputError, match="residual-stream"):
        logit_lens(model, TOKENS, probes=("ffn_up",))
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        logit_lens(model, TOKENS, target=10**6)


def test_lens_memory_is_bounded_whatever_the_length(tiny_gguf):
    """Qwen2.5 0.5B's head (152,064 x 896, 8-bit blocks, tied) over 24 layers: the compiled lens's
    temporaries stay under `lens_bound` for 64 and 1024 positions, far below the
    `[layers, T, vocab]` logits it never builds (compiled from shapes alone: nothing allocated)."""
    import dataclasses

    from jaxllama.gguf.blocks import Blocks

    c = dataclasses.replace(jaxllama.load(tiny_gguf).config, vocab_size=152_064, d_model=896, n_layer=24)
    sds = jax.ShapeDtypeStruct
    params = {"params": {"output_norm": {"scale": sds((896,), jnp.float32)},
                         "token_embd": {"embedding": Blocks(sds((152_064, 896), jnp.int8), sds((152_064, 28), jnp.float16))}}}
    r, sizes = c.n_layer, []
    for t in (64, 1024):
        compiled = lens_stats.lower(params, sds((r, t, 896), jnp.float32), sds((t,), jnp.int32), config=c, k=5,
                                    chunk=lens_chunk(r, c.vocab_size)).compile()
        sizes.append(compiled.memory_analysis().temp_size_in_bytes)
    bounds = [lens_bound(r, c.vocab_size, c.d_model, t) for t in (64, 1024)]
    assert sizes[0] <= bounds[0] and sizes[1] <= bounds[1], (sizes, bounds)
    assert bounds[1] < r * 1024 * c.vocab_size * 4 / 10  # a tenth of the [layers, T, vocab] logits


@pytest.mark.parametrize("name", MODELS)
def test_attention_weights_are_the_masked_softmax_of_q_and_k(tiny_factory, name):
    path = tiny_factory(MODELS[name])
    keep: dict = {}
    tokens = TOKENS + TOKENS[:4]  # longer than Gemma's window of 4
    reference_logits(path, tokens, keep)
    model = jaxllama.load(path)
    got = attention_patterns(model, tokens, layers=[0, model.config.n_layer - 1])
    for layer, w in got.items():
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(w, keep["attn_weights"][layer], atol=2e-6)
    with pytest.raises(InvalidInputError, match="out of range"):
        attention_patterns(model, tokens, layers=[model.config.n_layer])


@pytest.mark.parametrize("name", ["gqa-q8_0-untied", "gemma3-window"])
def test_direct_logit_attribution_matches_numpy(tiny_factory, name):
    path = tiny_factory(MODELS[name])
    model = jaxllama.load(path)
    c = model.config
    keep: dict = {}
    reference_logits(path, TOKENS, keep)
    import gguf

    r = gguf.GGUFReader(path)
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(d) for d in reversed(t.shape)]) for t in r.tensors}
    target = 5
    s = head_scores(model, TOKENS, target=target, induction_length=8)
    final = keep["l_out"][-1][-1]
    u = w.get("output.weight", w["token_embd.weight"])[target] * w["output_norm.weight"]
    u = u / np.sqrt(np.mean(final * final) + c.rms_eps)
    for layer in range(c.n_layer):
        wo = w[f"blk.{layer}.attn_output.weight"]  # [D, H*d]
        a = keep["kqv_out"][layer][-1]
        heads = np.stack([a[h * c.head_dim:(h + 1) * c.head_dim] @ wo[:, h * c.head_dim:(h + 1) * c.head_dim].T
                          for h in range(c.n_head)])
        if c.post_norms:
            o = heads.sum(0)
            heads = heads * w[f"blk.{layer}.post_attention_norm.weight"] / np.sqrt(np.mean(o * o) + c.rms_eps)
        np.testing.assert_allclose(s.direct_logit[layer], heads @ u, rtol=1e-4, atol=1e-5 * np.abs(heads @ u).max())
        p = keep["attn_weights"][layer]
        n = len(TOKENS)
        np.testing.assert_allclose(s.previous_token[layer], p[:, np.arange(1, n), np.arange(n - 1)].mean(-1), atol=1e-6)
        np.testing.assert_allclose(s.sink[layer], p[:, 1:, 0].mean(-1), atol=1e-6)


def test_a_planted_induction_head_scores_highest(tiny_factory):
    """Layer 1, head 0 made an induction head inside the real forward: its keys (KV head 0) at
    slot s encode the token at s - 1 and its query at t the token at t, so it attends to the
    token after the previous occurrence of the current one. It must get the top induction score."""
    path = tiny_factory(TinySpec(n_layer=3, vocab=96))
    model = jaxllama.load(path)
    c = model.config
    n = 12
    rep, offset = induction_tokens(model, n, seed=3)
    prev = np.array([-1] + rep[:-1])
    eye = np.eye(c.head_dim, dtype=np.float32)
    first = rep[offset: offset + n]  # distinct tokens: token -> its one-hot code (n <= head size)
    code = lambda ids: np.stack([eye[first.index(i)] if i in first else 0 * eye[0] for i in ids])  # noqa: E731
    kq = 40.0 * code(prev)  # [T, d]
    qq = code(rep)

    def keys(x, ctx):
        return x.at[0, :, 0].set(jnp.asarray(kq))

    def queries(x, ctx):
        return x.at[0, :, 0].set(jnp.asarray(qq))

    planted = [Intervention("Kcur", keys, (1,)), Intervention("Qcur", queries, (1,))]
    spec = ProbeSpec(capture=("Qcur", "Kcur"), interventions=tuple(planted))
    _, caps = forward_capture(model.params, jnp.asarray([rep]), c, probes=spec)
    i = np.arange(n - 1)
    scores = np.stack([np.asarray(weights_from_qk(caps["Qcur"][layer, 0], caps["Kcur"][layer, 0], c, False))
                       [:, offset + n + i, offset + i + 1].mean(-1) for layer in range(c.n_layer)])
    assert np.unravel_index(scores.argmax(), scores.shape) == (1, 0) and scores[1, 0] > 0.9
    plain = head_scores(model, TOKENS, target=1, induction_length=n, seed=3)
    assert plain.induction.max() < 0.5 and plain.induction_tokens == rep  # a random model has none


@pytest.mark.parametrize("probe", ["l_out", "attn_out", "kqv_out"])
def test_each_patching_cell_equals_a_single_patched_run(tiny_factory, probe):
    path = tiny_factory(VARIANTS["gqa-q8_0-untied"])
    model = jaxllama.load(path)
    c = model.config
    clean, corrupted = TOKENS, [TOKENS[0], 50, *TOKENS[2:]]
    answer, wrong = 5, 9
    sweep = patch_sweep(model, clean, corrupted, answer, wrong, probe=probe, batch=5)
    _, caps = forward_capture(model.params, jnp.asarray([clean]), c,
                                             probes=ProbeSpec(capture=(probe,)))
    _, bad = forward_capture(model.params, jnp.asarray([corrupted]), c,
                                            probes=ProbeSpec(capture=(probe,)))
    clean_logits, corr_logits = model.logits(clean)[-1], model.logits(corrupted)[-1]
    m = lambda logits: logits[answer] - logits[wrong]  # noqa: E731
    scale = np.abs(clean_logits).max()
    tol = reorder_bound(c) * scale
    assert abs(sweep.metric_clean - m(clean_logits)) <= 2 * tol and abs(sweep.metric_corrupted - m(corr_logits)) <= 2 * tol
    span = sweep.metric_clean - sweep.metric_corrupted
    width = c.n_head if probe == "kqv_out" else len(clean)
    assert sweep.grid.shape == (c.n_layer, width)
    for layer, i in ((0, 0), (0, width - 1), (1, 1), (1, width - 2)):  # each compiles anew: a few cells
        value = np.array(bad[probe][layer])
        if probe == "kqv_out":
            d = c.head_dim
            value[:, :, i * d:(i + 1) * d] = np.asarray(caps[probe][layer])[:, :, i * d:(i + 1) * d]
        else:
            value[:, i] = np.asarray(caps[probe][layer])[:, i]
        with jaxllama.trace(interventions=[interventions.patch(probe, value, [layer])]):
            want = m(model.logits(corrupted)[-1])
        assert abs(sweep.grid[layer, i] * span + sweep.metric_corrupted - want) <= 4 * tol, (layer, i)
    full = patch_sweep(model, clean, corrupted, answer, wrong, probe=probe, batch=5, resume=False)
    assert np.abs((full.grid - sweep.grid) * span).max() <= 4 * tol  # resuming at the layer changes nothing
    if probe == "l_out":  # the last layer's residual stream at the last position is the whole answer
        assert abs(sweep.grid[-1, -1] - 1) <= 8 * tol / abs(span)
        assert np.abs(sweep.grid[-1, :-1]).max() <= 8 * tol / abs(span)  # other positions: nothing


def test_patching_refuses_bad_input(tiny_gguf):
    model = jaxllama.load(tiny_gguf)
    with pytest.raises(InvalidInputError, match="same number of tokens"):
        patch_sweep(model, TOKENS, TOKENS[:-1], 5, 9)
    with pytest.raises(InvalidInputError, match="probe"):
        patch_sweep(model, TOKENS, TOKENS, 5, 9, probe="ffn_up")
    with pytest.raises(InvalidInputError, match="wrong token"):
        patch_sweep(model, TOKENS, TOKENS, 5)


def test_tuned_lens_beats_the_logit_lens_on_held_out_tokens(tiny_factory, tmp_path):
    from jaxllama.analysis.tuned import held_out_kl, load_translators, train_translators

    model = jaxllama.load(tiny_factory(TinySpec(n_layer=4)))
    rng = np.random.default_rng(0)
    train, held = rng.integers(0, 96, 1024).tolist(), rng.integers(0, 96, 256).tolist()
    tr = train_translators(model, train, steps=60, batch=64, ctx=64, lr=3e-3, progress=False)
    kl = held_out_kl(model, held, tr, ctx=64)
    assert all(t < lg for t, lg in zip(kl["tuned"][:-1], kl["logit"][:-1])), kl  # every layer with a translator
    assert kl["tuned"][-1] == kl["logit"][-1] and abs(kl["logit"][-1]) < 1e-6  # the last layer is the model's own
    path = tr.save(tmp_path / "t.npz")
    back = load_translators(path, model)
    assert np.array_equal(back.a, tr.a) and np.array_equal(back.b, tr.b) and back.model_sha256 == model.sha256
    lens, tuned = logit_lens(model, held[:16]), logit_lens(model, held[:16], translators=back)
    assert np.array_equal(lens.top_ids[-1], tuned.top_ids[-1]) and not np.allclose(lens.entropy[0], tuned.entropy[0])
    with pytest.raises(InvalidInputError, match="this model has 2 of width"):
        load_translators(path, jaxllama.load(tiny_factory(TinySpec())))
