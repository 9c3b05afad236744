"""Bad files and bad arguments: always a typed `JaxLlamaError` with a one-line message."""

import signal
from contextlib import contextmanager

import gguf
import numpy as np
import pytest

import jaxllama
from jaxllama import GGUFFormatError, InvalidInputError, JaxLlamaError, UnsupportedModelError
from tiny_models import TinySpec

T = gguf.GGMLQuantizationType


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging CI) if the block runs longer than `seconds`."""

    def handler(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang?")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert msg and "\n" not in msg
    return msg


def test_missing_empty_directory_and_random_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases = {
        tmp_path / "missing.gguf": "no such file",
        empty: "empty file",
        tmp_path: "is a directory",
        noise: "not a GGUF file",
    }
    for path, words in cases.items():
        with pytest.raises(GGUFFormatError) as e:
            jaxllama.load(path)
        assert words in _one_line(e.value) and str(path) in str(e.value)


def test_wrong_version(tiny_gguf, tmp_path):
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(data)
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 7"):
        jaxllama.load(bad)


def test_truncated_at_every_header_offset_and_through_the_data(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    f = jaxllama.read_gguf(tiny_gguf)
    header_end = min(t.offset for t in f.tensors.values())
    data_end = max(t.offset + t.nbytes for t in f.tensors.values())
    cuts = list(range(0, header_end + 40)) + list(np.linspace(header_end, data_end - 1, 150).astype(int))
    cut_file = tmp_path / "cut.gguf"
    with time_limit(120):
        for cut in cuts:
            cut_file.write_bytes(data[:cut])
            with pytest.raises(GGUFFormatError) as e:
                jaxllama.load(cut_file)
            _one_line(e.value)


def test_random_corruption_never_escapes_as_another_exception(tiny_gguf, tmp_path):
    """Flip bytes in the header (where structure lives): load succeeds or raises JaxLlamaError."""
    data = tiny_gguf.read_bytes()
    header_end = min(t.offset for t in jaxllama.read_gguf(tiny_gguf).tensors.values())
    rng = np.random.default_rng(1234)
    bad = tmp_path / "corrupt.gguf"
    outcomes = {"error": 0, "loaded": 0}
    with time_limit(300):
        for _ in range(400):
            corrupt = bytearray(data)
            for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
                corrupt[pos] = rng.integers(0, 256)
            bad.write_bytes(corrupt)
            try:
                jaxllama.load(bad)
                outcomes["loaded"] += 1
            except JaxLlamaError as e:
                _one_line(e)
                outcomes["error"] += 1
    assert outcomes["error"] > 100  # the corruption really hit structure


def test_vocab_only_gguf(tmp_path):
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="vocab-only"):
        jaxllama.load(path)


@pytest.mark.parametrize(
    "spec, words",
    [
        (TinySpec(architecture="gpt2"), "unsupported architecture 'gpt2'"),
        (TinySpec(drop=("blk.1.ffn_up.weight",)), "missing tensor 'blk.1.ffn_up.weight'"),
        (TinySpec(overrides={("attn_q", 0): T.Q8_1}), "tensor 'blk.0.attn_q.weight': tensor type Q8_1"),
    ],
)
def test_unsupported_models(tiny_factory, spec, words):
    with pytest.raises(UnsupportedModelError) as e:
        jaxllama.load(tiny_factory(spec))
    assert words in _one_line(e.value)


def test_unknown_tensor_type_id(tiny_gguf, tmp_path):
    f = jaxllama.read_gguf(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    # The type id of the first tensor sits right after its name and shape in the header.
    name = b"token_embd.weight"
    pos = data.index(name) + len(name) + 4 + 8 * len(f.tensors["token_embd.weight"].shape)
    assert int.from_bytes(data[pos : pos + 4], "little") == 0  # F32
    data[pos : pos + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "type99.gguf"
    bad.write_bytes(data)
    with pytest.raises(GGUFFormatError, match="unknown tensor type 99"):
        jaxllama.load(bad)


@pytest.mark.parametrize(
    "tokens, words",
    [
        ([], "empty token list"),
        ([1, 96], "token id 96 at index 1 is outside [0, 96)"),
        ([-1], "token id -1"),
        ([[1, 2]], "expected one sequence"),
        ([1.5], "must be integers"),
        (list(range(10)) * 26, "260 tokens exceed the context length 256"),
    ],
)
def test_bad_tokens(tiny_gguf, tokens, words):
    m = jaxllama.load(tiny_gguf)
    with pytest.raises(InvalidInputError) as e:
        m.logits(tokens)
    assert words in _one_line(e.value)


def test_bad_dtype(tiny_gguf):
    with pytest.raises(InvalidInputError, match="dtype"):
        jaxllama.load(tiny_gguf, dtype="float64")


@pytest.mark.parametrize("qtype", sorted(__import__("jaxllama.gguf.checks", fromlist=["x"]).FLOAT16_FIELDS,
                                         key=lambda t: t.value), ids=lambda t: t.name)
def test_float16_field_offsets_are_the_block_scales(qtype):
    """Independently of our table's source: with every listed field 1.0, gguf.quants dequantizes
    random blocks to finite values; a NaN in any one listed field makes that block NaN."""
    from jaxllama.gguf.checks import FLOAT16_FIELDS

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, size=(4, size), dtype=np.uint8)
    raw[:, :2] &= 0x3F  # keep the other bytes modest too (IQ grids index tables with them)
    for off in FLOAT16_FIELDS[qtype]:
        raw[:, off: off + 2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    ok = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(4, block)  # every listed type has a reference
    assert np.isfinite(ok).all()
    for off in FLOAT16_FIELDS[qtype]:
        bad = raw.copy()
        bad[2, off: off + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
        out = gguf.quants.dequantize(bad.reshape(-1), qtype).reshape(4, block)
        assert np.isnan(out[2]).any() and np.isfinite(out[[0, 1, 3]]).all()


def _patched(src, dst, name, at, data):
    """A copy of GGUF `src` with `data` written at byte `at` of tensor `name`'s data."""
    f = jaxllama.read_gguf(src)
    raw = bytearray(src.read_bytes())
    start = f.tensors[name].offset + at
    raw[start: start + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def test_nonfinite_block_scales_are_refused_with_the_tensor_named(tiny_factory, tmp_path, capsys):
    from jaxllama.cli.main import main

    src = tiny_factory(TinySpec(matrix_type=gguf.GGMLQuantizationType.Q4_1), 21)
    inf = np.float16(np.inf).tobytes()
    path = _patched(src, tmp_path / "inf.gguf", "blk.1.attn_k.weight", 20 * 3 + 2, inf)  # block 3's minimum
    with pytest.raises(GGUFFormatError, match="tensor 'blk.1.attn_k.weight' holds NaN or Inf"):
        jaxllama.load(path)
    for cmd in (["logits", "--tokens", "1,2", "--out", tmp_path / "x.npy"], ["generate", "--tokens", "1,2"]):
        assert main([*map(str, cmd), "--model", str(path)]) == 1
        err = capsys.readouterr().err
        assert "blk.1.attn_k.weight" in err and len(err.strip().splitlines()) == 1
    kept = jaxllama.load(path, allow_nonfinite=True)  # asked for: loaded as it is
    assert not np.isfinite(np.asarray(kept.logits([1, 2]))).all()


def test_tensors_sharing_bytes_are_refused(tiny_factory, tmp_path):
    import struct

    src = tiny_factory(TinySpec(), 22)
    f = jaxllama.read_gguf(src)
    a, b = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    raw = bytearray(src.read_bytes())
    data_start = min(t.offset for t in f.tensors.values())
    entry = raw.index(struct.pack("<Q", len(b)) + b.encode())  # b's header entry: name, dims, type, offset
    n_dims = struct.unpack_from("<I", raw, entry + 8 + len(b))[0]
    at = entry + 8 + len(b) + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", raw, at, f.tensors[a].offset - data_start)  # b now starts where a does
    path = tmp_path / "overlap.gguf"
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFFormatError, match="overlap"):
        jaxllama.read_gguf(path)
