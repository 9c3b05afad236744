"""`jaxllama tokenize` via subprocess: output, --json, --chat, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxllama", "tokenize", *args], capture_output=True, text=True, timeout=120)


def llamacpp_ids(path, text: str, add_special: bool, parse_special: bool) -> list[int]:
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return ref.tokenize(text.encode(), add_bos=add_special, special=parse_special)


@pytest.mark.llamacpp
def test_json_matches_llamacpp(default_gguf):
    text = "Hello <|im_end|> wörld"
    for flags, add, special in [((), True, False), (("--parse-special",), True, True),
                                (("--parse-special", "--no-add-special"), False, True)]:
        r = run("--model", str(default_gguf), "--text", text, "--json", *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"tokens": llamacpp_ids(default_gguf, text, add, special)}


def test_plain_output_lists_ids_and_pieces(llamacpp_vocab_dir):
    spm = llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf"
    r = run("--model", str(spm), "--text", "Hello world")
    assert r.returncode == 0, r.stderr
    rows = [line.split(None, 1) for line in r.stdout.splitlines()]
    assert [int(i) for i, _ in rows] == llamacpp_ids(spm, "Hello world", True, False)
    assert [json.loads(p) for _, p in rows] == ["<s>", " Hello", " world"]


@pytest.mark.llamacpp
def test_chat_mode(default_gguf):
    r = run("--model", str(default_gguf), "--text", "Hi", "--chat", "--json")
    assert r.returncode == 0, r.stderr
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads(r.stdout)["tokens"] == llamacpp_ids(default_gguf, prompt, True, True)


@pytest.mark.parametrize("case", ["missing", "bert", "no-template", "not-gguf"])
def test_errors_are_one_line(case, tmp_path, llamacpp_vocab_dir):
    args = {
        "missing": ["--model", str(tmp_path / "nope.gguf"), "--text", "x"],
        "bert": ["--model", str(llamacpp_vocab_dir / "ggml-vocab-bert-bge.gguf"), "--text", "x"],
        "no-template": ["--model", str(llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf"), "--text", "x", "--chat"],
        "not-gguf": ["--model", str(llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf.inp"), "--text", "x"],
    }[case]
    r = run(*args)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllama: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_usage_error_without_text():
    r = run()
    assert r.returncode == 2 and "--text" in r.stderr and "Traceback" not in r.stderr
