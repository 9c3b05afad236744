"""Probe-by-probe comparison with llama.cpp's own intermediate tensors (live, never skipped)."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.tracing.interventions import swap_swiglu
from jaxllama.reference import LlamaCpp, capture
from jaxllama.model import rope_angles
from jaxllama.tracing.probes import Intervention
from texts import TEXTS

pytestmark = pytest.mark.llamacpp  # runs llama.cpp in-process (see reference_gate)


@pytest.fixture(scope="module")
def tokens(f32_gguf):
    ref = LlamaCpp(f32_gguf, n_ctx=256)
    ids = ref.tokenize(TEXTS[0])
    ref.close()
    assert len(ids) >= 100
    return ids


@pytest.fixture(scope="module")
def model_f32(f32_gguf):
    return jaxllama.load(f32_gguf)


def test_every_probe_agrees_with_llamacpp_on_f32(model_f32, tokens):
    result = jaxllama.compare(model_f32, tokens)
    assert result.missing == {} and result.ok
    assert len(result.diffs) == 3 + 13 * model_f32.config.n_layer  # llama: 13 named tensors per layer
    for d in result.diffs:
        assert d.stat_rel_err <= 1e-3, (d.probe, d.layer, d.ours, d.theirs)
        assert d.rel_err <= 1e-4, (d.probe, d.layer, d.rel_err)
        assert d.max_abs <= 1e-4 * max(d.theirs["absmax"], 1.0), (d.probe, d.layer, d.max_abs)
    assert result.first_divergence is None


def test_planted_swiglu_bug_is_found_at_layer_0(model_f32, tokens):
    result = jaxllama.compare(model_f32, tokens[:40], interventions=[swap_swiglu(layers=[0])])
    first = result.first_divergence
    assert (first.probe, first.layer) == ("ffn_swiglu", 0)
    assert "first divergence: ffn_swiglu at layer 0" in result.summary()


def _rotate_half_rope(config):
    """Undo the (correct) adjacent-pair RoPE, then apply rotate-half RoPE: the classic GGUF port bug."""
    half = config.rope_dim // 2

    def fn(x, ctx):
        ang = rope_angles(ctx["positions"], config, None)[:, :, None, :]
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        pairs = x.reshape(*x.shape[:-1], half, 2)
        y0, y1 = pairs[..., 0], pairs[..., 1]
        x0, x1 = y0 * cos + y1 * sin, -y0 * sin + y1 * cos  # inverse rotation
        raw = jnp.stack([x0, x1], axis=-1).reshape(x.shape)
        a, b = raw[..., :half], raw[..., half:]
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    return fn


def test_planted_rope_bug_is_found_at_layer_0(model_f32, tokens):
    fn = _rotate_half_rope(model_f32.config)
    bugs = [Intervention("Qcur", fn, (0,)), Intervention("Kcur", fn, (0,))]
    result = jaxllama.compare(model_f32, tokens[:40], interventions=bugs)
    first = result.first_divergence
    assert (first.probe, first.layer) == ("Qcur", 0)
    assert first.cosine < 0.999
    # Position 0 has angle 0, so its row agrees and every later row does not: a RoPE bug, not a
    # projection bug.
    with jaxllama.trace(probes=[], capture=["Qcur"], capture_layers=[0], interventions=bugs) as rec:
        model_f32.logits(tokens[:40])
    ours = rec.activation("Qcur", 0)[0].reshape(40, -1)
    tensors, _, _ = capture(model_f32.source, tokens[:40], keep=lambda n: n == "Qcur-0")
    theirs = tensors["Qcur-0"].reshape(40, -1)
    rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert rel[0] < 1e-5 and (rel[1:] > 1e-2).all(), rel


def test_emulated_activation_quantization_closes_the_gap_on_q4_1(default_model, tokens):
    plain = jaxllama.compare(default_model, tokens[:64])
    emulated = jaxllama.compare(default_model, tokens[:64], act_quant=True)
    def err(result, probe):
        return next(d.rel_err for d in result.diffs if (d.probe, d.layer) == (probe, 0))

    for probe in ("Qcur", "Kcur", "Vcur"):  # the first quantized products: most of the gap closes
        assert err(emulated, probe) < err(plain, probe) / 4, probe
    for probe in ("attn_out", "ffn_out"):  # later ones: it still narrows
        assert err(emulated, probe) < err(plain, probe), probe


def test_compare_cli_json(f32_gguf, tokens):
    ids = ",".join(map(str, tokens[:24]))
    done = subprocess.run([sys.executable, "-m", "jaxllama", "compare", "--model", str(f32_gguf), "--tokens", ids, "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["first_divergence"] is None
    assert out["reproduce"]["model"]["sha256"] == jaxllama.load(f32_gguf).sha256
    assert out["reproduce"]["tokens"] == tokens[:24]
    assert len(out["probes"]) == 3 + 13 * 30
