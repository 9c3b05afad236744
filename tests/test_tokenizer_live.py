"""Tokenizer against llama.cpp live (llama-cpp-python, vocab_only): encode in every
add_special/parse_special mode, detokenize, round trips, streaming, bad input, speed."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

import jaxllama
from jaxllama.errors import InvalidInputError, UnsupportedModelError

pytestmark = pytest.mark.llamacpp  # runs llama.cpp in-process (see reference_gate)

CORPUS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello world", " Hello world", "Hello  world  ",
    "The quick brown fox jumps over the lazy dog.", "I'm sure you'll've done it, they're 'quoted' 'S 'LL",
    "Grüße aus München! Ça va? Ελληνικά, Русский текст, עברית, العربية, हिन्दी, ภาษาไทย",
    "中文测试，日本語のテキスト、한국어 텍스트", "emoji: 😀👍🏽👨‍👩‍👧‍👦 🇩🇪 ❤️", "1234567890 3.14159 1,000,000 -42 ²³ ٣٤ Ⅻ",
    "def f(x):\n    return x**2  # square\n\n\tif x != 0:\n\t\tpass", "   leading and trailing   ",
    "a\u00a0b\u3000c\u2028d\u200be\u0085f", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text <|im_end|> more <|endoftext|>x</s>y<s>z<unk>", "<|user|>\nTest</s>\n<|assistant|>\n",
    "[INST] hi [/INST]", "<reponame>repo<file_sep>path", "\r\n\r\nwindows\r\n", "a" * 300, " " * 50 + "x",
    "$ cat file | grep -v '^#' > out.txt && echo \"done\"", "https://example.com/path?q=1&b=2#frag",
    "Unicode combining: e\u0301 n\u0303 a\u0308", "zero\x00byte", "ﬁ ligature Ｆｕｌｌ　ｗｉｄｔｈ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "<s>", "</s>", "<<|im_start|>>", "<|im_start|<|im_start|>|>", "x<|im_end|>", "<|im_end|><|im_end|>",
]
MODES = [(a, p) for a in (False, True) for p in (False, True)]
EXTRA_VOCABS = ("phi-3", "qwen2", "llama-bpe", "gpt-2", "mpt", "command-r", "falcon", "deepseek-llm")


def reference(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def detokenize(ref, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    """llama.cpp's own llama_detokenize (llama-cpp-python's Llama.detokenize is a simplification)."""
    import llama_cpp

    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    n = llama_cpp.llama_detokenize(ref._model.vocab, arr, len(ids), None, 0, remove_special, unparse_special)
    size = abs(n) + 1
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(ref._model.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    assert n >= 0
    return buf.raw[:n]


@pytest.fixture(scope="module")
def spm_path(llamacpp_vocab_dir) -> Path:
    return llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def pairs(default_gguf, spm_path):
    """(our tokenizer, llama.cpp) for the default model and the llama-spm vocab."""
    return {
        "default": (jaxllama.load_tokenizer(default_gguf), reference(default_gguf)),
        "llama-spm": (jaxllama.load_tokenizer(spm_path), reference(spm_path)),
    }


@pytest.mark.parametrize("which", ["default", "llama-spm"])
def test_encode_matches_llamacpp_all_modes(pairs, which):
    tok, ref = pairs[which]
    for text in CORPUS:
        for add_special, parse_special in MODES:
            want = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            got = tok.encode(text, add_special=add_special, parse_special=parse_special)
            assert got == want, (text, add_special, parse_special)


@pytest.mark.parametrize("name", EXTRA_VOCABS)
def test_encode_matches_llamacpp_other_vocabs(llamacpp_vocab_dir, name):
    path = llamacpp_vocab_dir / f"ggml-vocab-{name}.gguf"
    tok, ref = jaxllama.load_tokenizer(path), reference(path)
    for text in CORPUS:
        for add_special, parse_special in MODES:
            want = ref.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            assert tok.encode(text, add_special=add_special, parse_special=parse_special) == want, (name, text)


def test_special_tokens_split_as_llamacpp(pairs):
    """Hand-checked facts: ChatML markers are single ids only with parse_special."""
    tok, _ = pairs["default"]
    im_start, im_end = tok.token_to_id["<|im_start|>"], tok.token_to_id["<|im_end|>"]
    with_special = tok.encode("<|im_start|>user<|im_end|>", add_special=False, parse_special=True)
    assert with_special[0] == im_start and with_special[-1] == im_end
    plain = tok.encode("<|im_start|>user<|im_end|>", add_special=False, parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert tok.decode(plain) == "<|im_start|>user<|im_end|>"
    # SmolLM adds no BOS (tokenizer.ggml.add_bos_token = false); llama-spm does
    assert tok.add_bos is False and tok.encode("hi") == tok.encode("hi", add_special=False)
    spm, _ = pairs["llama-spm"]
    assert spm.encode("hi")[0] == spm.bos_id == 1 and spm.encode("") == [1] and spm.encode("", add_special=False) == []


def test_zephyr_prompt_on_llama_spm(pairs):
    tok, ref = pairs["llama-spm"]
    prompt = "<|user|>\nTest</s>\n<|assistant|>\n"
    want = ref.tokenize(prompt.encode(), add_bos=True, special=True)
    got = tok.encode(prompt, add_special=True, parse_special=True)
    assert got == want
    assert got[0] == 1 and 2 in got  # BOS, and </s> became EOS (id 2)
    assert tok.encode(prompt, add_special=True, parse_special=False).count(2) == 0


@pytest.mark.parametrize("which", ["default", "llama-spm"])
def test_decode_matches_llama_detokenize(pairs, which):
    tok, ref = pairs[which]
    for text in CORPUS:
        for add_special, parse_special in MODES:
            ids = tok.encode(text, add_special=add_special, parse_special=parse_special)
            for remove_special in (False, True):
                for special in (False, True):
                    want = detokenize(ref, ids, remove_special, special)
                    assert tok.decode_bytes(ids, special=special, remove_special=remove_special) == want, text
                    assert tok.decode(ids, special=special, remove_special=remove_special) == want.decode("utf-8", "replace")


@pytest.mark.parametrize("which", ["default", "llama-spm"])
def test_round_trip_where_llamacpp_round_trips(pairs, which):
    tok, ref = pairs[which]
    trips = 0
    for text in CORPUS:
        ids = tok.encode(text, add_special=False)
        if detokenize(ref, ids, False, False).decode("utf-8", "replace") == text:
            assert tok.decode(ids) == text
            trips += 1
    assert trips >= len(CORPUS) - 2


def token_to_piece(ref, token: int, special: bool) -> bytes:
    """llama.cpp's llama_token_to_piece with a buffer large enough for any piece."""
    import llama_cpp

    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(ref._model.vocab, token, buf, 1024, 0, special)
    assert n >= 0
    return buf.raw[:n]


@pytest.mark.parametrize("which", ["default", "llama-spm"])
def test_pieces_match_llamacpp(pairs, which):
    tok, ref = pairs[which]
    for i in [*range(0, 300), *range(300, len(tok), 7)]:
        for special in (False, True):
            assert tok.token_to_piece(i, special=special) == token_to_piece(ref, i, special), (i, special)


def test_byte_fallback_and_streaming(pairs):
    tok, ref = pairs["llama-spm"]
    ids = tok.encode("😀", add_special=False)
    # llama-spm has no emoji token: "▁" then four <0xXX> byte tokens
    assert [tok.tokens[i] for i in ids] == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ids == ref.tokenize("😀".encode(), add_bos=False, special=False)
    assert [tok.token_to_piece(i) for i in ids[1:]] == [bytes([b]) for b in "😀".encode()]
    dec = tok.stream_decoder()
    outs = [dec.push(i) for i in ids]
    assert outs == ["", "", "", "", "😀"]  # the leading space is the SPM prefix; bytes wait for the 4th
    assert dec.flush() == ""
    text = "Grüße 😀 中文 ok"
    ids = tok.encode(text, add_special=False)
    assert "".join(tok.decode_stream(ids)) == text == tok.decode(ids)
    # an incomplete sequence at the end is held back, then flushed as U+FFFD
    dec = tok.stream_decoder()
    assert dec.push(tok.token_to_id["<0xF0>"]) == "" and dec.push(tok.token_to_id["<0x9F>"]) == ""
    assert dec.flush() == "\ufffd"


def test_invalid_utf8_decodes_with_replacement(pairs):
    tok, ref = pairs["llama-spm"]
    ids = [tok.token_to_id["<0xFF>"], tok.token_to_id["<0xC3>"], tok.token_to_id["\u2581a"]]
    assert detokenize(ref, ids, False, False) == b"\xff\xc3 a"
    assert tok.decode(ids) == "\ufffd\ufffd a"
    assert "".join(tok.decode_stream(ids)) == "\ufffd\ufffd a"


def test_bad_input(pairs):
    tok, _ = pairs["default"]
    n = len(tok)
    for ids in ([n], [-1], [1, 2, 10**12]):
        with pytest.raises(InvalidInputError, match="outside the vocabulary"):
            tok.decode(ids)
    with pytest.raises(InvalidInputError):
        tok.decode([1.5])
    with pytest.raises(InvalidInputError):
        tok.decode("1,2")
    with pytest.raises(InvalidInputError):
        tok.token_to_piece(n)
    with pytest.raises(InvalidInputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        tok.encode("lone \ud800 surrogate")
    assert tok.decode(np.array([19556, 216], dtype=np.int64)) == "Hello "


def _with_metadata(src: Path, dst: Path, changes: dict, drop: tuple[str, ...] = ()) -> Path:
    """Copy a vocab-only GGUF with some tokenizer metadata changed (gguf.GGUFWriter)."""
    import gguf

    from jaxllama.gguf.reader import read_gguf

    md = read_gguf(src).metadata
    w = gguf.GGUFWriter(str(dst), md.get("general.architecture", "llama"))
    for key, value in {**md, **changes}.items():
        if key in drop or key.startswith("GGUF.") or key == "general.architecture":
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, np.ndarray):
            w.add_array(key, value.tolist())
        else:
            w.add_array(key, list(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unsupported_and_missing_tokenizer_metadata(llamacpp_vocab_dir, tmp_path):
    gpt2 = llamacpp_vocab_dir / "ggml-vocab-gpt-2.gguf"
    bad_pre = _with_metadata(gpt2, tmp_path / "badpre.gguf", {"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(UnsupportedModelError, match="unknown pre-tokenizer 'no-such-pre'"):
        jaxllama.load_tokenizer(bad_pre)
    kimi = _with_metadata(gpt2, tmp_path / "kimi.gguf", {"tokenizer.ggml.pre": "kimi-k2"})
    with pytest.raises(UnsupportedModelError, match="'kimi-k2' is not supported"):
        jaxllama.load_tokenizer(kimi)
    bad_type = _with_metadata(gpt2, tmp_path / "badtype.gguf", {"tokenizer.ggml.model": "mystery"})
    with pytest.raises(UnsupportedModelError, match="tokenizer type 'mystery'"):
        jaxllama.load_tokenizer(bad_type)
    no_tok = _with_metadata(gpt2, tmp_path / "notok.gguf", {}, drop=("tokenizer.ggml.model", "tokenizer.ggml.tokens"))
    with pytest.raises(UnsupportedModelError, match="no tokenizer metadata"):
        jaxllama.load_tokenizer(no_tok)
    # a missing pre name means llama.cpp's 'default' pre-tokenizer, as in llama.cpp
    no_pre = _with_metadata(gpt2, tmp_path / "nopre.gguf", {}, drop=("tokenizer.ggml.pre",))
    text = "Hello, world! 12345 foo+bar"
    want = reference(no_pre).tokenize(text.encode(), add_bos=False, special=False)
    assert jaxllama.load_tokenizer(no_pre).encode(text, add_special=False) == want
    with pytest.raises(jaxllama.GGUFFormatError):
        jaxllama.load_tokenizer(tmp_path / "missing.gguf")


def test_model_carries_its_tokenizer(default_model, default_gguf):
    tok = default_model.tokenizer
    assert isinstance(tok, jaxllama.Tokenizer)
    assert default_model.tokenizer is tok  # cached
    text = "<|im_start|>user\nHello!<|im_end|>\n"
    assert tok.encode(text, parse_special=True) == jaxllama.load_tokenizer(default_gguf).encode(text, parse_special=True)
    assert tok.eos_id == 2 and tok.bos_id == 1 and 2 in tok.eog_ids


def test_one_megabyte_matches_llamacpp(pairs, llamacpp_vocab_dir):
    """A large input, id for id (its speed is measured in tools/bench.py, not asserted here)."""
    base = (llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8") + "\n".join(CORPUS)
    text = (base * (1_000_000 // len(base) + 1))[:1_000_000]
    for which in ("default", "llama-spm"):
        tok, ref = pairs[which]
        ids = tok.encode(text)
        assert len(ids) > 250_000
        assert ids == ref.tokenize(text.encode("utf-8"), add_bos=True, special=False)
