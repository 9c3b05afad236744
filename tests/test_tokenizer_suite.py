"""llama.cpp's own tokenizer test suite: every `ggml-vocab-*.gguf` with `.inp`/`.out` in the
llama-cpp-python sdist. The `.out` ids come from llama.cpp's tests (test-tokenizer-0: tokenize
with add_special=false, parse_special=false); we must reproduce them exactly, or the vocabulary
must be listed in UNSUPPORTED_VOCABS with the reason, and then it must be refused with a
clear error. Nothing is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

import jaxllama
from jaxllama.errors import UnsupportedModelError

# The vocabularies with .inp/.out in llama-cpp-python 0.3.36 (vendor/llama.cpp/models).
SUITE = (
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
    "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
)

# What we do not support, and why. Exactly these must fail (with UnsupportedModelError).
UNSUPPORTED_VOCABS = {
    "bert-bge": "tokenizer.ggml.model 'bert' is WordPiece (BERT), a different algorithm (normalizer, "
                "greedy longest-match); jaxllama serves Llama-family (SentencePiece / byte-level BPE) models",
    "gemma-4": "tokenizer.ggml.model 'gemma4' is SentencePiece-style BPE on raw UTF-8 with a 262k vocab and "
               "515k merges and llama.cpp-specific newline handling; not implemented",
}


def read_cases(path: Path) -> list[tuple[str, list[int]]]:
    """Parse `.inp`/`.out` the way llama.cpp's test-tokenizer-0.cpp does."""
    raw = Path(str(path) + ".inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outputs = [[int(x) for x in line.split()] for line in Path(str(path) + ".out").read_text().splitlines()]
    assert len(inputs) == len(outputs), f"{path.name}: {len(inputs)} inputs, {len(outputs)} outputs"
    return list(zip(inputs, outputs))


def test_suite_is_what_we_expect(llamacpp_vocab_dir):
    found = sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in llamacpp_vocab_dir.glob("ggml-vocab-*.gguf.inp"))
    assert found == sorted(SUITE)
    for name in found:
        assert (llamacpp_vocab_dir / f"ggml-vocab-{name}.gguf.out").is_file()
    assert set(UNSUPPORTED_VOCABS) <= set(SUITE)


@pytest.mark.parametrize("name", SUITE)
def test_llamacpp_vocab_suite(llamacpp_vocab_dir, name):
    path = llamacpp_vocab_dir / f"ggml-vocab-{name}.gguf"
    cases = read_cases(path)
    assert len(cases) >= 40
    if name in UNSUPPORTED_VOCABS:
        with pytest.raises(UnsupportedModelError) as e:
            jaxllama.load_tokenizer(path).encode("x")
        assert str(path) in str(e.value) and "not supported" in str(e.value)
        return
    tok = jaxllama.load_tokenizer(path)
    bad = []
    for text, expected in cases:
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            bad.append((text, expected, got))
    assert not bad, f"{name}: {len(bad)}/{len(cases)} cases differ, first: {bad[0]!r}"


def test_the_sdist_is_hash_checked(tmp_path):
    """A tampered or different archive is refused (and removed), never unpacked."""
    from conftest import llamacpp_vocabs

    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(pytest.fail.Exception, match="sha256 .* expected 832db069"):
        llamacpp_vocabs(tmp_path)
    assert not fake.exists() and not (tmp_path / "models").exists()
