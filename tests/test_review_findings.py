"""One test per finding of the code review (issue 9): each failed before its fix.

CLI arguments, the forward_step boundary, loading, the bfloat16 contract, stable statistics,
token bytes, traces during generation, and a comparison that must not claim what it did not check.
"""

import importlib
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxllama
from jaxllama import GGUFFormatError, InvalidInputError
from jaxllama.cli.main import parse_layers
from jaxllama.generation import Sampler, generate, stream
from jaxllama.model import forward_step, init_cache
from jaxllama.tracing.probes import statistics_of
from tiny_models import TinySpec, write_tiny_gguf

T = gguf.GGMLQuantizationType


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("jaxllama: error:"), done.stderr
    for w in words:
        assert w in lines[0], lines[0]


# --- CLI arguments ----------------------------------------------------------------------------

def test_huge_penalty_window_is_refused_not_allocated(tiny_gguf):
    done = run("generate", "--model", tiny_gguf, "--tokens", "1,2", "--repeat-penalty", "1.1",
               "--penalty-last-n", str(10**12), "--max-new-tokens", "2")
    one_line_error(done, "penalty_last_n", "context length 256")


def test_huge_layer_range_is_refused_before_it_is_expanded():
    with pytest.raises(InvalidInputError, match="layer 1000000000000000000 out of range; valid layers: 0..29"):
        parse_layers(f"0-{10**18}", n_layer=30)
    with pytest.raises(InvalidInputError, match="'7-3' is an empty range"):
        parse_layers("7-3", n_layer=30)
    assert parse_layers("0,2,5-7", n_layer=30) == [0, 2, 5, 6, 7]


def test_huge_layer_range_on_the_command_line(tiny_gguf):
    one_line_error(run("trace", "--model", tiny_gguf, "--tokens", "1,2", "--layers", "0-1000000000"),
                   "layer 1000000000 out of range; valid layers: 0..1")


@pytest.mark.parametrize("tol", ["nan", "-1", "0", "inf"])
def test_compare_tolerance_must_be_a_positive_number(tiny_gguf, tol):
    one_line_error(run("compare", "--model", tiny_gguf, "--tokens", "1,2", "--tol", tol),
                   "--tol must be a finite number > 0")


def test_logits_out_is_written_where_it_is_named(tiny_gguf, tmp_path):
    out = tmp_path / "x"
    done = run("logits", "--model", tiny_gguf, "--tokens", "1,2,3", "--out", out)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not (tmp_path / "x.npy").exists()
    np.testing.assert_array_equal(np.load(out), jaxllama.load(tiny_gguf).logits([1, 2, 3]))
    assert f"wrote {out}:" in done.stderr


# --- forward_step boundary --------------------------------------------------------------------

@pytest.mark.parametrize("start, width", [(63, 2), (-1, 1), (64, 1)])
def test_forward_step_refuses_slots_outside_the_cache(tiny_gguf, start, width):
    m = jaxllama.load(tiny_gguf)
    cache = init_cache(m.config, 1, 64)
    with pytest.raises(InvalidInputError, match="cache slots"):
        forward_step(m.params, jnp.ones((1, width), jnp.int32), cache, start, jnp.zeros(1, jnp.int32), m.config)


# --- loading ----------------------------------------------------------------------------------

def test_saved_model_honours_dtype(tiny_gguf, tmp_path):
    path = jaxllama.load(tiny_gguf).save(tmp_path / "m.msgpack")
    reloaded = jaxllama.load(path, dtype="bfloat16")
    assert reloaded.dtype == "bfloat16"
    assert reloaded.params["params"]["layers"]["attn_q"]["kernel"].dtype == jnp.bfloat16
    assert reloaded.params["params"]["layers"]["attn_norm"]["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(reloaded.logits([1, 2, 3]), jaxllama.load(tiny_gguf, dtype="bfloat16").logits([1, 2, 3]))


def test_act_quant_checks_the_saved_models_source_file(tmp_path):
    src = write_tiny_gguf(tmp_path / "q41.gguf", TinySpec(matrix_type=T.Q4_1), seed=1)
    saved = jaxllama.load(src).save(tmp_path / "m.msgpack")
    jaxllama.load(saved).with_act_quant(True)  # the same file: fine
    write_tiny_gguf(src, TinySpec(matrix_type=T.Q4_1), seed=2)  # same name, other weights
    with pytest.raises(GGUFFormatError, match="differs from the saved model's source"):
        jaxllama.load(saved).with_act_quant(True)


# --- bfloat16: weights stored in bfloat16, arithmetic in float32 ------------------------------

def test_bfloat16_means_rounded_weights_and_float32_arithmetic(tiny_factory):
    path = tiny_factory(TinySpec(n_layer=3, tied=False))
    f32, bf16 = jaxllama.load(path), jaxllama.load(path, dtype="bfloat16")
    rounded = jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32)),
                           f32.params)
    norms = lambda p: {k: v for k, v in p["params"]["layers"].items() if "scale" in v}  # noqa: E731
    for k, v in norms(f32.params).items():  # norms are not rounded
        rounded["params"]["layers"][k] = v
    rounded["params"]["output_norm"] = f32.params["params"]["output_norm"]
    want = np.asarray(jaxllama.forward_jit(rounded, jnp.asarray([[1, 5, 9, 33, 70]]), f32.config))[0]
    got = bf16.logits([1, 5, 9, 33, 70])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# --- statistics -------------------------------------------------------------------------------

def test_std_is_stable_when_the_mean_dwarfs_the_spread():
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(0, 1e-2, size=(2, 5, 256))).astype(np.float32)  # |mean| / std = 1e6
    valid = np.ones((2, 5), bool)
    valid[1, 3:] = False
    for per_position in (False, True):
        stats = np.asarray(statistics_of({"x": jnp.asarray(x)}, jnp.asarray(valid), per_position)["x"])
        for b in range(2):
            rows = [t for t in range(5) if valid[b, t]]
            for t in (rows if per_position else [None]):
                ref = (x[b, t] if per_position else x[b, rows]).astype(np.float64)
                got = stats[b, t] if per_position else stats[b]
                assert abs(got[2] - ref.std()) <= 2e-3 * ref.std(), (per_position, b, t, got[2], ref.std())
                assert abs(got[1] - ref.mean()) <= 1e-6 * abs(ref.mean())


# --- token bytes ------------------------------------------------------------------------------

def _bad_utf8_vocab(path):
    """A vocab-only SentencePiece GGUF with two entries of invalid UTF-8 (ids 5 and 6)."""
    w = gguf.GGUFWriter(str(path), "llama")
    raw = [t.encode() for t in ("<unk>", "<s>", "</s>", "a", "b")] + [b"\xe2\x82", b"\xff"]  # a cut euro sign, 0xFF
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", raw)
    w.add_array("tokenizer.ggml.scores", [0.0] * len(raw))
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3, 1, 1, 1, 1])
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_invalid_utf8_vocabulary_entries_keep_their_bytes(tmp_path):
    tok = jaxllama.load_tokenizer(_bad_utf8_vocab(tmp_path / "bad-utf8.gguf"))
    assert tok.token_to_piece(5) == b"\xe2\x82" and tok.token_to_piece(6) == b"\xff"
    assert tok.decode_bytes([5, 3]) == b"\xe2\x82a"
    assert tok.encode("ab", add_special=False) == [3, 4]


@pytest.mark.llamacpp
def test_invalid_utf8_vocabulary_entries_match_llamacpp(tmp_path):
    import ctypes

    import llama_cpp

    path = _bad_utf8_vocab(tmp_path / "bad-utf8.gguf")
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = jaxllama.load_tokenizer(path)
    for t in (5, 6):
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(ref._model.vocab, t, buf, 64, 0, True)
        assert tok.token_to_piece(t) == buf.raw[:n]
    assert tok.encode("ab", add_special=False) == ref.tokenize(b"ab", add_bos=False, special=False)


# --- traces during generation -----------------------------------------------------------------

def test_generation_reports_statistics_per_generated_token(tiny_factory):
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))
    prompt = [5, 6, 7]
    with jaxllama.trace(probes=["l_out"], layers=[1]) as rec:
        out = generate(m, [prompt], 4, stop_at_eog=False).tokens[0]
    steps = [r for r in rec.records if r.get("step", 0) > 0]
    assert [r["position"] for r in steps] == [3, 4, 5]  # one record per decode step: the tokens fed back
    # each equals the statistics of that token's l_out in a plain forward of the whole sequence
    with jaxllama.trace(probes=[], capture=["l_out"], capture_layers=[1]) as full:
        m.logits(prompt + out)
    l_out = full.activation("l_out", 1)[0]
    for r in steps:
        x = l_out[r["position"]].astype(np.float64)
        assert abs(r["rms"] - np.sqrt(np.mean(x * x))) <= 1e-4 * r["rms"]
        assert abs(r["max"] - x.max()) <= 1e-4 * abs(x).max()


def test_generation_prefill_reports_the_prompt_and_its_last_logits(tiny_factory):
    """The prefill computes logits for each row's last prompt token only (the one sampled from):
    its output statistics are that token's, while the embedding's cover the whole prompt."""
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))
    prompt = [5, 6, 7]
    with jaxllama.trace(probes=["inp_embd", "result_output"]) as rec:
        generate(m, [prompt], 2, stop_at_eog=False)
    first = {r["probe"]: r for r in rec.records if r["step"] == 0}
    with jaxllama.trace(probes=[], capture=["inp_embd", "result_output"]) as full:
        m.logits(prompt)
    logits = full.activation("result_output")[0].astype(np.float64)
    embd = full.activation("inp_embd")[0].astype(np.float64)
    assert first["result_output"]["position"] == 2 and "position" not in first["inp_embd"]
    for got, want in ((first["result_output"], logits[2]), (first["inp_embd"], embd)):
        assert abs(got["rms"] - np.sqrt(np.mean(want * want))) <= 1e-5 * got["rms"]
        assert abs(got["min"] - want.min()) <= 1e-5 * np.abs(want).max()


def test_interventions_apply_during_generation(tiny_factory):
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))  # (tied tiny models repeat one token)
    plain = generate(m, [[5, 6, 7]], 6, stop_at_eog=False).tokens[0]
    with jaxllama.trace(probes=[], interventions=[jaxllama.interventions.scale("attn_out", 0.0)]):
        ablated = generate(m, [[5, 6, 7]], 6, stop_at_eog=False).tokens[0]
        streamed = list(stream(m, [5, 6, 7], 6, stop_at_eog=False))
    with jaxllama.trace(probes=[], capture=["attn_out"], interventions=[jaxllama.interventions.zero("attn_out")]):
        want = m.logits([5, 6, 7] + ablated[:-1])
    assert ablated == [int(t) for t in np.argmax(want[2:], axis=-1)]
    assert streamed == ablated and ablated != plain


def test_capture_during_generation_is_refused(tiny_gguf):
    m = jaxllama.load(tiny_gguf)
    with jaxllama.trace(capture=["l_out"]):
        with pytest.raises(InvalidInputError, match="capture"):
            generate(m, [[5, 6, 7]], 2)


# --- comparison -------------------------------------------------------------------------------

def test_compare_lists_missing_probes_and_fails(tiny_gguf, monkeypatch):
    """An empty or unreadable capture must not read as agreement."""
    cmp = importlib.import_module("jaxllama.reference.compare")
    monkeypatch.setattr(cmp, "is_installed", lambda: True)
    monkeypatch.setattr(cmp, "capture", lambda path, ids, keep, n_threads: ({}, None, {"l_out-0": "ggml type 30"}))
    result = cmp.compare(jaxllama.load(tiny_gguf), [1, 2, 3])
    assert not result.ok and result.diffs == []
    assert result.missing["l_out-0"] == "ggml type 30" and result.missing["attn_norm-0"] == "not produced"
    first, second = result.summary().splitlines()
    assert first == "no probe could be compared" and second.startswith("NOT CHECKED: 29 probes missing")
    assert result.as_dict()["ok"] is False
