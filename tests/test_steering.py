"""Steering vectors and llama.cpp control vectors: the file format both ways (written by us, read by
ggml's own GGUF reader; llama.cpp's layout of layers), the logits llama.cpp computes with the same
vector (live, on the F32 model), the numpy reference on tiny models, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from numpy_reference import reference_logits
from test_model import TOKENS, VARIANTS

import jaxllama
from jaxllama.analysis.steering import pair_differences, steering_vector
from jaxllama.errors import GGUFFormatError, InvalidInputError
from jaxllama.gguf.control_vector import ControlVector, combine, read_control_vector, write_control_vector
from jaxllama.reference import LlamaCpp
from jaxllama.reference.control_vector import llamacpp_control_vectors
from jaxllama.tracing import interventions

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to"


def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True)


def random_vector(n_layer: int, width: int, seed: int, scale: float = 0.5, arch: str = "llama") -> ControlVector:
    d = np.random.default_rng(seed).standard_normal((n_layer, width)).astype(np.float32) * np.float32(scale)
    d[0] = 0  # llama.cpp has no direction for layer 0
    return ControlVector(d, arch)


def test_written_files_read_back_through_ggml_as_llamacpp_lays_them_out(tmp_path):
    a, b = random_vector(6, 64, 0), random_vector(4, 64, 1)
    pa, pb = write_control_vector(tmp_path / "a.gguf", a), write_control_vector(tmp_path / "b.gguf", b)
    r = gguf.GGUFReader(pa)
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.layer_count").contents() == 5
    assert [t.name for t in r.tensors] == [f"direction.{n}" for n in range(1, 6)]
    back = read_control_vector(pa)
    assert np.array_equal(back.directions, a.directions) and back.model_hint == "llama"
    # ggml's reader and common_control_vector_load's arithmetic: layer 1 first, files summed with scales
    n, data = llamacpp_control_vectors([(pa, 0.75), (pb, -2.0)])
    ours = combine([(read_control_vector(pa), 0.75), (read_control_vector(pb), -2.0)])
    assert n == 64 and np.array_equal(data.reshape(-1, 64), ours.directions[1:])


@pytest.mark.llamacpp
def test_control_vector_logits_match_llamacpp(tmp_path, f32_gguf):
    """The same file in llama.cpp (`llama_set_adapter_cvec`) and in jaxllama, on the F32 model.
    Without a vector the two differ by float32 reordering alone (about 2e-4 of logits ~30); the
    bound is 1e-4 of the largest logit. The vector moves the logits by ~20, and the same vector one
    layer off (a misread of llama.cpp's layout) moves them far past the bound."""
    model = jaxllama.load(f32_gguf)
    c = model.config
    path = write_control_vector(tmp_path / "cv.gguf", random_vector(c.n_layer, c.d_model, 0))
    cv = read_control_vector(path)
    ref = LlamaCpp(f32_gguf, n_ctx=64)
    try:
        tokens = ref.tokenize(PROMPT)
        base = ref.logits(tokens)
        n, data = llamacpp_control_vectors([(path, 1.5)])
        for layer_range in ((1, c.n_layer), (3, 10)):
            ref.set_control_vector(n, data, *layer_range)
            want = ref.logits(tokens)
            got = model.with_control_vector(cv.scaled(1.5), layer_range).logits(tokens)
            bound = 1e-4 * np.abs(want).max()
            assert np.abs(got - want).max() <= bound, layer_range
            assert np.abs(want - base).max() > 1000 * bound  # the vector does act
            shifted = ControlVector(np.roll(cv.directions, 1, axis=0), "llama").scaled(1.5)
            off = model.with_control_vector(shifted, layer_range).logits(tokens)
            assert np.abs(off - want).max() > 100 * bound
        ref.set_control_vector(n, None, 0, 0)
        assert np.array_equal(ref.logits(tokens), base)
    finally:
        ref.close()


@pytest.mark.parametrize("name", ["gqa-q8_0-untied", "mha-f32"])
def test_control_vector_is_added_to_layer_outputs_as_the_numpy_reference(tiny_factory, name):
    path = tiny_factory(VARIANTS[name])
    model = jaxllama.load(path)
    c = model.config
    cv = random_vector(c.n_layer, c.d_model, 3, scale=0.3)
    want = reference_logits(path, TOKENS, add={layer: cv.directions[layer].astype(np.float64)
                                               for layer in range(1, c.n_layer)})
    got = model.with_control_vector(cv).logits(TOKENS)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the `add` intervention at l_out computes the same thing
    with jaxllama.trace(interventions=[interventions.add("l_out", cv.directions)]):
        also = model.logits(TOKENS)
    assert np.array_equal(also, got)
    # every entry point carries it: a decode step after a prefill gives the same last logits
    steered = model.with_control_vector(cv)
    out = jaxllama.generate(steered, [TOKENS], max_new_tokens=2, stop_at_eog=False)
    step = steered.logits([*TOKENS, out.tokens[0][0]])[-1]
    assert out.tokens[0] == [int(np.argmax(got[-1])), int(np.argmax(step))]
    assert model.with_control_vector(None).control is None and "control" not in \
        model.with_control_vector(cv).with_control_vector(None).params["params"]["layers"]


def test_steering_vector_is_the_mean_difference_of_the_numpy_streams(tiny_factory):
    path = tiny_factory(VARIANTS["gqa-q8_0-untied"])
    model = jaxllama.load(path)
    c = model.config
    pos = [TOKENS[:6], TOKENS[3:12]]
    neg = [[*TOKENS[:3], 40, 41, 42], TOKENS[4:13]]
    samples = [[] for _ in range(c.n_layer - 1)]
    for p, n in zip(pos, neg):
        kp, kn = {}, {}
        reference_logits(path, p, kp)
        reference_logits(path, n, kn)
        for layer in range(1, c.n_layer):
            d = kp["l_out"][layer - 1] - kn["l_out"][layer - 1]  # the stream entering `layer`
            samples[layer - 1].append(d[np.abs(d).max(axis=-1) > 1e-9])
    got = [len(s) for s in pair_differences(model, pos, neg)]
    assert got == [sum(len(x) for x in s) for s in samples]  # the shared 3-token prefix is dropped
    mean = steering_vector(model, pos, neg, "mean")
    pca = steering_vector(model, pos, neg, "pca")
    assert not mean.directions[0].any()
    for layer in range(1, c.n_layer):
        d = np.concatenate(samples[layer - 1])
        m = d.mean(axis=0)
        assert np.allclose(mean.directions[layer], m / np.linalg.norm(m), atol=1e-5)
        v = np.linalg.svd(d, full_matrices=False)[2][0]
        v = v if v @ m >= 0 else -v
        assert np.allclose(pca.directions[layer], v, atol=1e-4)
    with pytest.raises(InvalidInputError, match="no token for ' '"):  # this vocabulary cannot pad as llama.cpp does
        steering_vector(model, [TOKENS[:5]], [TOKENS[:7]])
    last = steering_vector(model, [TOKENS[:5]], [TOKENS[:7]], positions="last")
    k5, k7 = {}, {}
    reference_logits(path, TOKENS[:5], k5)
    reference_logits(path, TOKENS[:7], k7)
    d = k5["l_out"][0][-1] - k7["l_out"][0][-1]
    assert np.allclose(last.directions[1], d / np.linalg.norm(d), atol=1e-5)


def test_a_steering_vector_steers_the_default_model(default_model):
    """Built from sentiment pairs, added with a positive strength it raises a positive word's odds
    over a negative one after a neutral prompt, and with a negative strength lowers them."""
    tok = default_model.tokenizer
    pos = ["I love this, it is wonderful and makes me happy.", "What a great, delightful day!",
           "This is excellent, I am so glad."]
    neg = ["I hate this, it is awful and makes me sad.", "What a terrible, miserable day!",
           "This is horrible, I am so upset."]
    cv = steering_vector(default_model, [tok.encode(t) for t in pos], [tok.encode(t) for t in neg])
    prompt = tok.encode("Honestly, the movie was")
    good, bad = tok.encode(" great", add_special=False)[0], tok.encode(" terrible", add_special=False)[0]

    def odds(model):
        z = model.logits(prompt)[-1]
        return z[good] - z[bad]

    base = odds(default_model)
    up = odds(default_model.with_control_vector(cv.scaled(4.0), (5, 20)))
    down = odds(default_model.with_control_vector(cv.scaled(-4.0), (5, 20)))
    assert down < base < up, (down, base, up)


def test_bad_control_vectors_are_refused(tmp_path, tiny_gguf):
    model = jaxllama.load(tiny_gguf)
    c = model.config
    with pytest.raises(InvalidInputError, match="width"):
        model.with_control_vector(random_vector(c.n_layer, c.d_model + 1, 0))
    with pytest.raises(InvalidInputError, match="architecture"):
        model.with_control_vector(random_vector(c.n_layer, c.d_model, 0, arch="gemma3"))
    with pytest.raises(InvalidInputError, match="past the model's last layer"):
        model.with_control_vector(random_vector(c.n_layer + 2, c.d_model, 0))
    with pytest.raises(InvalidInputError, match="layer range"):
        model.with_control_vector(random_vector(c.n_layer, c.d_model, 0), (1, c.n_layer + 1))
    with pytest.raises(InvalidInputError, match="finite"):
        random_vector(c.n_layer, c.d_model, 0).scaled(float("nan"))
    with pytest.raises(GGUFFormatError, match="not a control vector"):
        read_control_vector(tiny_gguf)
    bad = tmp_path / "zero.gguf"
    w = gguf.GGUFWriter(bad, "controlvector")
    w.add_tensor("direction.0", np.ones(c.d_model, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFFormatError, match="direction.N with N >= 1"):
        read_control_vector(bad)


def test_steer_cli_writes_a_vector_that_generate_and_perplexity_apply(tmp_path, default_model):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love this, it is wonderful.\nWhat a great day!\n")
    neg.write_text("I hate this, it is awful.\nWhat a terrible day!\n")
    out = tmp_path / "happy.gguf"
    done = run("steer", "--positive", pos, "--negative", neg, "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    n = default_model.config.n_layer
    assert info["layers"] == list(range(1, n)) and all(s > 0 for s in info["samples"])
    assert info["reproduce"]["settings"]["method"] == "mean"
    cv = read_control_vector(out)
    assert cv.directions.shape == (n, default_model.config.d_model) and cv.model_hint == "llama"
    plain = run("generate", "--prompt", "The movie was", "--max-new-tokens", 8, "--temperature", 0, "--json")
    steered = run("generate", "--prompt", "The movie was", "--max-new-tokens", 8, "--temperature", 0, "--json",
                  "--control-vector", f"{out}:6", "--control-vector-layer-range", 5, 20)
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr
    a, b = json.loads(plain.stdout), json.loads(steered.stdout)
    prompt = default_model.tokenizer.encode("The movie was")
    want = default_model.with_control_vector(cv.scaled(6.0), (5, 20)).logits(prompt)[-1].argmax()
    assert b["tokens"][0] == int(want) and a["tokens"] != b["tokens"]
    assert b["reproduce"]["model"]["control_vector"]["layer_range"] == [5, 20]
    traces = [run("trace", "--prompt", "The movie was", "--probes", "l_out", "--json", *extra)
              for extra in ((), ("--control-vector", f"{out}:6", "--control-vector-layer-range", 5, 20))]
    assert all(t.returncode == 0 for t in traces), traces[1].stderr
    rms = [{r["layer"]: r["rms"] for r in json.loads(t.stdout)["records"]} for t in traces]
    assert rms[0][4] == rms[1][4] and rms[0][5] != rms[1][5]  # the vector acts from layer 5 on
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ppl = [run("perplexity", "--file", text, "--ctx", 64, "--chunks", 1, "--json", *extra)
           for extra in ((), ("--control-vector", f"{out}:6"))]
    assert all(p.returncode == 0 for p in ppl), ppl[1].stderr
    assert json.loads(ppl[0].stdout)["ppl"] != json.loads(ppl[1].stdout)["ppl"]


@pytest.mark.parametrize("args, message", [
    (("--control-vector", "missing.gguf"), "no such file"),
    (("--control-vector", "{cv}:nan"), "finite"),
    (("--control-vector", "{cv}:x"), "not a number"),
    (("--control-vector", "{cv}", "--control-vector-layer-range", 0, 99), "layer range"),
    (("--control-vector-layer-range", 1, 2), "needs --control-vector"),
    (("--control-vector", "{wide}"), "width"),
])
def test_control_vector_options_refuse_bad_input(tmp_path, default_model, args, message):
    c = default_model.config
    cv = write_control_vector(tmp_path / "cv.gguf", random_vector(c.n_layer, c.d_model, 0))
    wide = write_control_vector(tmp_path / "wide.gguf", random_vector(c.n_layer, c.d_model + 8, 0))
    argv = [str(a).format(cv=cv, wide=wide) for a in args]
    done = run("logits", "--tokens", "1,2,3", "--out", tmp_path / "z.npy", *argv)
    assert done.returncode == 1 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
