"""Probes, statistics through jax.debug callbacks, capture and interventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama import InvalidInputError
from jaxllama.tracing.interventions import patch, scale, swap_swiglu, zero
from jaxllama.model import forward
from jaxllama.tracing.probes import ORDER, STAT_NAMES, Intervention, ProbeSpec, statistics_numpy
from tiny_models import TinySpec

TOKENS = [3, 17, 5, 90, 44, 2, 8, 8, 61, 0, 33, 12]


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return jaxllama.load(tiny_factory(TinySpec(n_layer=3, tied=False)))


def _close(ours: dict, ref: dict, rel=1e-5):
    scale = max(ref["rms"], 1e-12)
    for k in STAT_NAMES:
        assert abs(ours[k] - ref[k]) <= rel * max(abs(ref[k]), scale), (k, ours[k], ref[k])


def test_statistics_equal_numpy_on_captured_tensors(tiny):
    with jaxllama.trace(capture=ORDER) as rec:
        logits = tiny.logits(TOKENS)
    assert len(rec.records) == len(tiny.config.layer_probes) * 3 + len(tiny.config.global_probes) == 13 * 3 + 3
    for r in rec.records:
        _close(r, statistics_numpy(rec.activation(r["probe"], r["layer"])[0]))
    np.testing.assert_array_equal(rec.activation("result_output")[0], logits)


def test_tracing_does_not_change_logits(tiny):
    plain = tiny.logits(TOKENS)
    with jaxllama.trace(capture=["l_out", "Qcur"], per_position=True):
        traced = tiny.logits(TOKENS)
    np.testing.assert_array_equal(traced, plain)


def _lowered(model, spec):
    return jax.jit(forward, static_argnames=("config", "probes")).lower(
        model.params, jnp.asarray([TOKENS]), model.config, probes=spec
    ).as_text()


def test_no_callback_in_the_program_when_tracing_is_off(tiny):
    off = _lowered(tiny, None)
    assert "callback" not in off
    assert _lowered(tiny, ProbeSpec()) == off  # an empty selection is the same program
    on = _lowered(tiny, ProbeSpec(stats=ORDER))
    assert "callback" in on


def test_layer_filter_and_probe_filter(tiny):
    with jaxllama.trace(probes=["ffn_out", "result_norm"], layers=[1]) as rec:
        tiny.logits(TOKENS)
    assert {(r["probe"], r["layer"]) for r in rec.records} == {("ffn_out", 1), ("result_norm", None)}


def test_per_position_statistics(tiny):
    with jaxllama.trace(probes=["attn_out"], per_position=True, capture=["attn_out"], capture_layers=[2]) as rec:
        tiny.logits(TOKENS)
    per_pos = [r for r in rec.records if r["layer"] == 2]
    assert [r["position"] for r in per_pos] == list(range(len(TOKENS)))
    captured = rec.activation("attn_out", 2)[0]
    for r in per_pos:
        _close(r, statistics_numpy(captured[r["position"]]))


def test_capture_keeps_only_selected_layers(tiny):
    with jaxllama.trace(probes=[], capture=["ffn_gate"], capture_layers=[0, 2]) as rec:
        tiny.logits(TOKENS)
    assert rec.captured[0]["ffn_gate"].shape == (2, 1, len(TOKENS), 128)
    with pytest.raises(KeyError, match="captured layers: \\[0, 2\\]"):
        rec.activation("ffn_gate", 1)


def test_padded_rows_have_the_statistics_of_single_rows(tiny):
    rows = [TOKENS, TOKENS[:5]]
    with jaxllama.trace(probes=["l_out"], layers=[2]) as batch:
        tiny.logits_batch(rows)
    with jaxllama.trace(probes=["l_out"], layers=[2]) as single:
        tiny.logits(rows[1])
    _close(batch.records[1], single.records[0], rel=1e-4)


def test_unknown_probe_or_layer_lists_the_valid_ones(tiny):
    with pytest.raises(InvalidInputError, match="unknown probe 'attn_nrom'; valid probes: inp_embd, inp_scaled, attn_norm"):
        jaxllama.trace(probes=["attn_nrom"]).__enter__()
    with pytest.raises(InvalidInputError, match="layer 3 out of range; valid layers: 0..2"):
        with jaxllama.trace(layers=[3]):
            tiny.logits(TOKENS)
    with pytest.raises(InvalidInputError, match="capture layer 7 out of range"):
        with jaxllama.trace(capture=["l_out"], capture_layers=[7]):
            tiny.logits(TOKENS)


def test_nan_is_reported_with_its_probe_and_layer(tiny):
    poison = Intervention("ffn_up", lambda x, ctx: x.at[0, 3, 5].set(jnp.nan), (1,))
    with jaxllama.trace(interventions=[poison]) as rec:
        with pytest.warns(RuntimeWarning, match="NaN"):
            tiny.logits(TOKENS)
    first = rec.nonfinite()[0]
    assert (first["probe"], first["layer"], first["nan"]) == ("ffn_up", 1, 1.0)
    assert "!! 1 NaN" in rec.table()


def test_zero_attention_output(tiny):
    with jaxllama.trace(capture=["inp_embd", "ffn_inp"], capture_layers=[0], interventions=[zero("attn_out", [0])]) as rec:
        tiny.logits(TOKENS)
    np.testing.assert_array_equal(rec.activation("ffn_inp", 0), rec.activation("inp_embd"))


def test_scale_applies_only_at_chosen_layers(tiny):
    with jaxllama.trace(capture=["ffn_out"]) as plain:
        tiny.logits(TOKENS)
    with jaxllama.trace(capture=["ffn_out", "ffn_inp", "l_out"], interventions=[scale("ffn_out", 2.0, [1])]) as rec:
        tiny.logits(TOKENS)
    np.testing.assert_array_equal(rec.activation("ffn_out", 0), plain.activation("ffn_out", 0))
    np.testing.assert_allclose(rec.activation("ffn_out", 1), 2 * plain.activation("ffn_out", 1), rtol=1e-6)
    np.testing.assert_allclose(rec.activation("l_out", 1), rec.activation("ffn_inp", 1) + rec.activation("ffn_out", 1), rtol=1e-6)


def test_patching_a_captured_residual_stream_reproduces_the_other_prompt(tiny):
    other = [7, 7, 7, 1, 2, 3, 4, 5, 6, 9, 10, 11]
    with jaxllama.trace(capture=["l_out"], capture_layers=[0]) as src:
        want = tiny.logits(other)
    with jaxllama.trace(interventions=[patch("l_out", src.activation("l_out", 0), [0])]):
        got = tiny.logits(TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_swapped_swiglu_form(tiny):
    with jaxllama.trace(capture=["ffn_gate", "ffn_up", "ffn_swiglu"], interventions=[swap_swiglu([2])]) as rec:
        tiny.logits(TOKENS)
    g, u = rec.activation("ffn_gate", 2), rec.activation("ffn_up", 2)
    np.testing.assert_allclose(rec.activation("ffn_swiglu", 2), g * u / (1 + np.exp(-u)), rtol=1e-5, atol=1e-7)
    g0, u0 = rec.activation("ffn_gate", 0), rec.activation("ffn_up", 0)
    np.testing.assert_allclose(rec.activation("ffn_swiglu", 0), g0 / (1 + np.exp(-g0)) * u0, rtol=1e-5, atol=1e-7)


def test_recorder_renders(tiny, tmp_path):
    with jaxllama.trace() as rec:
        tiny.logits(TOKENS)
    assert "layer  probe" in rec.table() and "<pre>" in rec._repr_html_()
    assert "1 call(s)" in repr(rec) and "no NaN/Inf" in repr(rec)
    rec.plot(tmp_path / "rms.png")
    assert (tmp_path / "rms.png").read_bytes()[:4] == b"\x89PNG"
