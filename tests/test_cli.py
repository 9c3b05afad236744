"""The command line, run as a user would: `python -m jaxllama ...` in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import jaxllama


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True, **kw)


def assert_clean_error(done, *words):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("jaxllama: error:") and "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0]


def test_info_default_model(default_gguf):
    done = run("info")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for words in ["architecture   llama", "layers         30", "9 query, 3 key/value, size 64",
                  "Q4_1: 210, F32: 61, Q8_0: 1", "tied to token_embd", "gpt2 (pre smollm), 49152 tokens",
                  "chat template  present"]:
        assert words in out


def test_info_json_matches_file(tiny_gguf):
    done = run("info", "--model", tiny_gguf, "--json")
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    f = jaxllama.read_gguf(tiny_gguf)
    assert s["tensors"] == len(f.tensors) and s["supported"] is True
    assert s["config"]["n_layer"] == 2 and s["config"]["vocab_size"] == 96


def test_logits_writes_exactly_those_tokens(tmp_path, tiny_gguf):
    out = tmp_path / "l.npy"
    done = run("logits", "--model", tiny_gguf, "--tokens", "5, 6,7", "--out", out)
    assert done.returncode == 0, done.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (3, 96)
    np.testing.assert_array_equal(got, jaxllama.load(tiny_gguf).logits([5, 6, 7]))


def test_logits_default_model(tmp_path, default_model):
    out = tmp_path / "d.npy"
    done = run("logits", "--tokens", "1,2,3", "--out", out)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(out), default_model.logits([1, 2, 3]))


def test_act_quant_on_logits_trace_and_generate(tmp_path, default_model):
    """`--act-quant` on every command that computes logits: the API's emulated numbers, recorded
    in the `reproduce` block."""
    out = tmp_path / "aq.npy"
    done = run("logits", "--tokens", "1,2,3,4,5,6", "--out", out, "--act-quant")
    assert done.returncode == 0, done.stderr
    want = default_model.with_act_quant().logits([1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(np.load(out), want)
    assert not np.array_equal(want, default_model.logits([1, 2, 3, 4, 5, 6]))  # the emulation changes them
    done = run("trace", "--tokens", "1,2,3", "--probes", "l_out", "--layers", "0", "--json", "--act-quant")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reproduce"]["model"]["act_quant"] is True
    done = run("generate", "--tokens", "1,2,3", "--max-new-tokens", "4", "--temperature", "0", "--json", "--act-quant")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["reproduce"]["model"]["act_quant"] is True
    assert got["tokens"] == jaxllama.generate(default_model.with_act_quant(), [[1, 2, 3]], 4).tokens[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tokens", "1,x", "--out", "o.npy"], ["--tokens", "'x' is not an integer"]),
        (["--tokens", "", "--out", "o.npy"], ["empty token list"]),
        (["--tokens", "1,999", "--out", "o.npy"], ["token id 999"]),
        (["--tokens", "1", "--out", "/no/such/dir/o.npy"], ["--out", "does not exist"]),
    ],
)
def test_logits_bad_arguments(tmp_path, tiny_gguf, args, words):
    assert_clean_error(run("logits", "--model", tiny_gguf, *args, cwd=tmp_path), *words)


def test_bad_model_files(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:1000])
    assert_clean_error(run("info", "--model", cut), str(cut), "truncated")
    assert_clean_error(run("logits", "--model", tmp_path / "none.gguf", "--tokens", "1", "--out", "x.npy"),
                       "no such file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_clean_error(run("info", "--model", text), "not a GGUF file")


def test_usage_error_exit_code():
    done = run("logits")
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr
