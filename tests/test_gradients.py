"""Gradients through the exact quantized weights and attribution patching, against independent
references: central finite differences of the float64 numpy forward (tests/numpy_reference.py),
the same model in float32 weights, and real patched runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import reference_logits
from test_model import TOKENS, VARIANTS
from test_parallel import reorder_bound

import jaxllama
from jaxllama.analysis import attribution_sweep, log_prob, logit_diff, patch_sweep, probe_gradients, rank_correlation
from jaxllama.errors import InvalidInputError
from jaxllama.gguf.blocks import Blocks


def central_difference(path, tokens, metric, layer, direction, eps=1e-4):
    """d metric / d eps of the float64 numpy forward with `eps * direction` added to `l_out` at `layer`."""
    plus = metric(reference_logits(path, tokens, add={layer: eps * direction})[-1])
    minus = metric(reference_logits(path, tokens, add={layer: -eps * direction})[-1])
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("name", ["gqa-q8_0-untied", "k-quants-mixed"])
def test_gradient_equals_float64_central_differences(tiny_factory, name):
    path = tiny_factory(VARIANTS[name])
    model = jaxllama.load(path)
    answer, wrong = 5, 9
    g = probe_gradients(model, TOKENS, logit_diff(answer, wrong), probes=("l_out", "attn_out"))
    assert set(g.grads) == {"l_out", "attn_out"} and g.grads["l_out"].shape == (model.config.n_layer, len(TOKENS),
                                                                                 model.config.d_model)
    metric = lambda z: z[answer] - z[wrong]  # noqa: E731
    assert abs(g.value - metric(reference_logits(path, TOKENS)[-1])) <= 1e-4 * max(1.0, abs(g.value))
    rng = np.random.default_rng(0)
    for layer in range(model.config.n_layer):
        v = rng.standard_normal((len(TOKENS), model.config.d_model))
        want = central_difference(path, TOKENS, metric, layer, v)
        got = float(np.sum(g.grads["l_out"][layer] * v))
        assert abs(got - want) <= 1e-4 * abs(want), (layer, got, want)
    # the last layer's other positions never reach the last position's logits: exactly zero there
    assert not g.grads["l_out"][-1][:-1].any() and not g.grads["attn_out"][-1][:-1].any()
    assert np.abs(g.grads["attn_out"][-1][-1]).max() > 0


def test_gradient_through_one_token_uses_the_kernels_transpose(tiny_factory):
    """One token per row runs the gemv kernel (no derivative of its own): its custom derivative
    is the transpose product from the same blocks, checked against central differences."""
    path = tiny_factory(VARIANTS["gqa-q8_0-untied"])
    model = jaxllama.load(path)
    g = probe_gradients(model, TOKENS[:1], log_prob(5))
    lp = lambda z: z[5] - np.log(np.sum(np.exp(z - z.max()))) - z.max()  # noqa: E731
    v = np.random.default_rng(1).standard_normal((1, model.config.d_model))
    want = central_difference(path, TOKENS[:1], lp, 0, v)
    assert abs(float(np.sum(g.grads["l_out"][0] * v)) - want) <= 1e-4 * abs(want)


def test_gradient_keeps_no_float_copy_of_the_weights(default_model):
    """The compiled gradient of the default model (4-bit blocks) needs less scratch memory than the
    float32 copy of its layers' matrices that a backward pass keeping each product's float32
    matrix would hold on its own (measured: 749 MB that way, 325 MB with the blocks as the
    products' only residual, at 64 tokens)."""
    from jaxllama.analysis.gradients import _metric_run

    c = default_model.config
    tokens = jax.ShapeDtypeStruct((64,), jnp.int32)
    compiled = _metric_run.lower(default_model.params, tokens, c, ("l_out",), logit_diff(1, 2)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    layers = default_model.params["params"]["layers"]
    blocks = [b for b in jax.tree.leaves(layers, is_leaf=lambda x: isinstance(x, Blocks)) if isinstance(b, Blocks)]
    f32 = sum(4 * int(np.prod(b.scale.shape[:-1])) * b.width for b in blocks)  # every layer matrix in float32
    assert len(blocks) == 7 and temp < f32, (temp, f32)


def test_native_gradients_match_float32_weights(default_gguf, default_model):
    """The same gradient with the blocks and with the model's float32 copy (the same values):
    only the order of float32 sums differs, forward and backward (twice tests/test_parallel's bound)."""
    f32 = jaxllama.load(default_gguf, weights="float32")
    tokens = default_model.tokenizer.encode("The capital of France is", add_special=True)
    m = logit_diff(*default_model.tokenizer.encode(" Paris London", add_special=False)[:2])
    a = probe_gradients(default_model, tokens, m).grads["l_out"]
    b = probe_gradients(f32, tokens, m).grads["l_out"]
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 2 * reorder_bound(default_model.config) * scale


@pytest.mark.parametrize("probe", ["l_out", "kqv_out"])
def test_attribution_cells_are_float64_directional_derivatives(tiny_factory, probe):
    """Each cell is grad . (clean - corrupted) there: the float64 directional derivative of the
    metric along that cell's patch (for l_out, central differences of the numpy forward)."""
    path = tiny_factory(VARIANTS["gqa-q8_0-untied"])
    model = jaxllama.load(path)
    c = model.config
    clean, corrupted = TOKENS, [TOKENS[0], 50, *TOKENS[2:]]
    answer, wrong = 5, 9
    est = attribution_sweep(model, clean, corrupted, answer, wrong, probe=probe)
    real = patch_sweep(model, clean, corrupted, answer, wrong, probe=probe, batch=5)
    assert est.grid.shape == real.grid.shape
    assert abs(est.metric_clean - real.metric_clean) <= 1e-4 * abs(real.metric_clean)
    assert np.all(est.grid[:, 0] == 0) if probe == "l_out" else True  # position 0 is the same in both prompts
    if probe == "l_out":
        keep_c, keep_b = {}, {}
        reference_logits(path, clean, keep_c)
        reference_logits(path, corrupted, keep_b)
        metric = lambda z: z[answer] - z[wrong]  # noqa: E731
        span = est.metric_clean - est.metric_corrupted
        for layer, pos in ((0, 1), (1, 1), (1, len(TOKENS) - 1)):
            v = np.zeros((len(TOKENS), c.d_model))
            v[pos] = keep_c["l_out"][layer][pos] - keep_b["l_out"][layer][pos]
            want = central_difference(path, corrupted, metric, layer, v)
            assert abs(est.grid[layer, pos] * span - want) <= 1e-4 * abs(want) + 1e-5, (layer, pos)
    else:  # per head: the cells sum to the whole kqv_out patch's estimate
        l_out = attribution_sweep(model, clean, corrupted, answer, wrong, probe="kqv_out")
        assert np.allclose(l_out.grid, est.grid)
    assert rank_correlation(est.grid, est.grid) == pytest.approx(1.0)


def test_attribution_tracks_the_real_sweep_on_the_default_model(default_model):
    """On the default model the first-order grid ranks the cells as the real sweep does (a property
    of the model, not of our code: reported, and required to be clearly positive)."""
    tok = default_model.tokenizer
    clean = tok.encode("The Eiffel Tower is in the city of", add_special=True)
    corrupted = tok.encode("The Colosseum is in the city of", add_special=True)
    if len(clean) != len(corrupted):
        pytest.fail(f"the prompt pair must have equal lengths: {len(clean)} and {len(corrupted)}")
    answer, wrong = tok.encode(" Paris", add_special=False)[0], tok.encode(" Rome", add_special=False)[0]
    est = attribution_sweep(default_model, clean, corrupted, answer, wrong)
    real = patch_sweep(default_model, clean, corrupted, answer, wrong)
    rho = rank_correlation(est.grid, real.grid)
    print(f"attribution vs real patching, rank correlation {rho:.3f}")
    assert rho > 0.5


def test_bad_metrics_are_refused(tiny_gguf):
    model = jaxllama.load(tiny_gguf)
    with pytest.raises(InvalidInputError, match="scalar"):
        probe_gradients(model, TOKENS, lambda z: z[:3])
    with pytest.raises(InvalidInputError, match="probe"):
        probe_gradients(model, TOKENS, logit_diff(1, 2), probes=("result_output",))
    with pytest.raises(InvalidInputError, match="wrong token"):
        attribution_sweep(model, TOKENS, TOKENS, 5)
