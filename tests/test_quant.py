"""jaxllama.quant against llama.cpp itself: every type's bytes against `ggml_quantize_chunk`, whole
files against `llama_model_quantize`, importance matrices against what llama.cpp's eval callback
shows its matrix products and against its imatrix reader."""

from __future__ import annotations

import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

from jaxllama.errors import InvalidInputError
from jaxllama.quant import QUANT_TYPES, quantize

T = gguf.GGMLQuantizationType
GPL = "/usr/share/common-licenses/GPL-3"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True)


def _hard_rows(n: int = 512) -> np.ndarray:
    """Random rows at many scales, plus the corner cases of the searches: an all-zero row, zero and
    constant runs, one-signed rows, tiny values, an outlier, ties at half steps."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, n)) * rng.uniform(1e-3, 3, (48, 1))
    x[1] = 0
    x[2, :32] = 0
    x[3, 40:300] = 0.75
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    x[6, :256] *= 1e-7
    x[7, 17] = 200.0
    x[8] = np.round(x[8] * 4) / 8  # many exact halves
    x[9, ::2] = 0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def rows(f32_gguf) -> dict[str, np.ndarray]:
    """The hard rows, and rows of three matrices of the default model off their Q4_1/Q8_0 grid by
    seeded noise."""
    r = gguf.GGUFReader(f32_gguf)
    rng = np.random.default_rng(3)
    out = {}
    for t in r.tensors:
        if t.name in ("blk.2.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"):
            x = np.asarray(t.data, np.float32).reshape(-1, int(t.shape[0]))[:96]
            out[t.name] = x + np.float32(0.05) * x.std() * rng.standard_normal(x.shape).astype(np.float32)
    return {"hard": _hard_rows(), **out}


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_bytes_equal_ggml_quantize_chunk(qtype, rows):
    from jaxllama.reference.quantize import ggml_quantize

    t = T[qtype]
    rng = np.random.default_rng(11)
    for what, x in rows.items():
        if x.shape[1] % gguf.GGML_QUANT_SIZES[t][0]:
            x = x[:, : x.shape[1] // 256 * 256]  # 576-wide rows: the K-quants take a 512 slice
        qw = rng.gamma(0.5, 1.0, x.shape[1]).astype(np.float32)  # imatrix-like: skewed, some near 0
        qw[:5] = 0
        for imatrix in (None, qw):
            ours, ref = quantize(x, t, imatrix), ggml_quantize(x, t, imatrix)
            assert ours.shape == ref.shape
            bad = np.nonzero((ours != ref).any(axis=1))[0]
            assert bad.size == 0, f"{qtype} {what} imatrix={imatrix is not None}: rows {bad[:8]} differ"


def test_bad_input_is_refused():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(InvalidInputError, match="not a type"):
        quantize(x, "Q7_K")
    with pytest.raises(InvalidInputError, match="blocks of 256"):
        quantize(np.ones((2, 96), np.float32), "Q4_K")
    with pytest.raises(InvalidInputError, match="NaN"):
        quantize(np.full((1, 32), np.nan, np.float32), "Q8_0")
    with pytest.raises(InvalidInputError, match="importance matrix has 32"):
        quantize(x, "Q4_K", np.ones(32, np.float32))
    with pytest.raises(InvalidInputError, match="non-negative"):
        quantize(x, "Q4_K", -np.ones(256, np.float32))


def test_blocks_dequantize_near_the_input():
    """Independent of llama.cpp: gguf-py's dequantizer reads our bytes back within each type's step."""
    x = _hard_rows()[10:20]
    for qtype, rel in (("Q8_0", 0.01), ("Q6_K", 0.03), ("Q5_K", 0.06), ("Q4_K", 0.12), ("Q3_K", 0.25),
                       ("IQ4_NL", 0.12), ("Q4_0", 0.15), ("Q5_1", 0.06)):
        back = gguf.quants.dequantize(quantize(x, qtype), T[qtype]).reshape(x.shape)
        err = np.sqrt(np.mean((back - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
        assert err.max() < rel, (qtype, err.max())


@pytest.fixture(scope="module")
def imatrix_file(tmp_path_factory, f32_gguf):
    """An importance matrix of the F32 default model written by `jaxllama imatrix` (4 chunks of 64)."""
    out = tmp_path_factory.mktemp("imatrix") / "im.gguf"
    done = _cli("imatrix", "--model", f32_gguf, "--file", GPL, "--ctx", 64, "--chunks", 4, "--batch", 2, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def _same_files(a, b) -> None:
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for x, y in zip(ra.tensors, rb.tensors):
        assert (x.tensor_type, list(x.shape)) == (y.tensor_type, list(y.shape)), x.name
        assert np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)), x.name
    fa = {k: f.contents() for k, f in ra.fields.items() if not k.startswith(("GGUF.", "quantize.imatrix"))}
    fb = {k: f.contents() for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    assert fa == fb


@pytest.mark.llamacpp
def test_quantize_cli_with_our_imatrix_equals_llama_quantize(tmp_path, f32_gguf, imatrix_file):
    """`jaxllama quantize --pure --imatrix` and llama_model_quantize fed the same file through
    llama.cpp's own imatrix reader write the same tensors (Q4_K where rows fill 256-value blocks,
    llama.cpp's Q5_0 fallback elsewhere) and the same metadata."""
    from jaxllama.quant.file import FILE_TYPES
    from jaxllama.reference.imatrix import llamacpp_read_imatrix
    from jaxllama.reference.quantize import llama_quantize

    ours = tmp_path / "ours.gguf"
    done = _cli("quantize", "--base", f32_gguf, "--type", "Q4_K", "--pure", "--imatrix", imatrix_file,
                "--out", ours, "--json")
    assert done.returncode == 0, done.stderr
    import json

    summary = json.loads(done.stdout)
    assert summary["types"] == {"F32": 61, "Q5_0": 181, "Q4_K": 30}
    assert summary["with_imatrix"] == 210  # every layer matrix; token_embd has no entry
    ref = tmp_path / "ref.gguf"
    llama_quantize(f32_gguf, ref, int(FILE_TYPES["Q4_K"]), pure=True, imatrix=llamacpp_read_imatrix(imatrix_file))
    _same_files(ours, ref)
    meta = gguf.GGUFReader(ours)
    assert meta.get_field("quantize.imatrix.entries_count").contents() == 210


@pytest.mark.llamacpp
def test_quantize_file_without_imatrix_equals_llama_quantize(tmp_path, f32_gguf):
    from jaxllama.quant.file import FILE_TYPES, quantize_file
    from jaxllama.reference.quantize import llama_quantize

    res = quantize_file(f32_gguf, tmp_path / "ours.gguf", "Q6_K")
    assert {t.type.name for t in res.tensors} == {"F32", "Q6_K", "Q8_0"}
    llama_quantize(f32_gguf, tmp_path / "ref.gguf", int(FILE_TYPES["Q6_K"]), pure=True)
    _same_files(tmp_path / "ours.gguf", tmp_path / "ref.gguf")
    size = sum(int(np.asarray(t.data).nbytes) for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors)
    assert res.nbytes == size


@pytest.mark.llamacpp
def test_imatrix_equals_llamacpp_matrix_inputs(f32_gguf):
    """Per matrix, the sums of squared inputs over two 64-token chunks agree with the inputs of
    llama.cpp's MUL_MAT ops (read in its eval callback, summed as collect_imatrix sums them); on the
    F32 model both sides compute the same float32 activations, so only reordering separates them."""
    import jaxllama
    from jaxllama.quant.imatrix import chunks_of, compute_imatrix
    from jaxllama.reference.imatrix import llamacpp_imatrix
    from jaxllama.scoring.perplexity import read_text

    model = jaxllama.load(f32_gguf)
    tok = model.tokenizer
    chunks = chunks_of(tok.encode(read_text(GPL), add_special=True), 64, tok.bos_id, limit=2)
    assert (chunks[:, 0] == tok.bos_id).all()
    ours = compute_imatrix(model, chunks, batch=2)
    sums, counts = llamacpp_imatrix(f32_gguf, chunks)
    assert set(ours.sums) == set(sums) and len(sums) == 7 * model.config.n_layer
    for name, ref in sums.items():
        assert ours.counts[name][0] == counts[name] == 128
        scale = np.abs(ref).max()
        # each side: 128 float32 squares summed (relative error <= 128 * 2^-24) of activations that
        # agree to ~1e-5 of their scale after 30 float32 layers; 1e-4 of the largest sum bounds both
        assert np.abs(ours.sums[name][0] - ref).max() <= 1e-4 * scale, name


def test_imatrix_files_round_trip_and_legacy_dat(tmp_path, imatrix_file):
    """Our GGUF file reads back exactly through llama.cpp's steps (ggml's reader) and ours; a
    legacy .dat written here in llama.cpp's layout (means times ncall) gives the same weights."""
    from jaxllama.quant.imatrix import read_imatrix
    from jaxllama.reference.imatrix import llamacpp_read_imatrix

    im = read_imatrix(imatrix_file)
    assert im.chunk_count == 4 and im.chunk_size == 64 and im.datasets == [GPL]
    want = llamacpp_read_imatrix(imatrix_file)
    got = im.weights()
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    dat = tmp_path / "im.dat"
    with open(dat, "wb") as f:
        f.write(struct.pack("<i", len(want)))
        for name, w in want.items():
            ncall = 4
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, w.size))
            f.write((w * np.float32(ncall)).astype("<f4").tobytes())
        f.write(struct.pack("<i", 4) + struct.pack("<i", len(GPL)) + GPL.encode())
    legacy = read_imatrix(dat)
    assert legacy.legacy and legacy.chunk_count == 4 and legacy.datasets == [GPL]
    lw = legacy.weights()
    for k in want:
        np.testing.assert_allclose(lw[k], want[k], rtol=2e-7, atol=0)


def test_quantize_cli_bad_input_leaves_no_file(tmp_path, f32_gguf, default_gguf, capsys):
    from jaxllama.cli import main

    from jaxllama.quant.imatrix import Imatrix, write_imatrix

    other = write_imatrix(tmp_path / "other.gguf", Imatrix(  # a 640-wide model's matrix
        sums={"blk.0.attn_q.weight": np.ones((1, 640))}, counts={"blk.0.attn_q.weight": np.ones(1)},
        datasets=["x"], chunk_count=1, chunk_size=64))
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"not an imatrix")
    out = tmp_path / "out.gguf"
    for args, msg in [
        (("--base", default_gguf, "--type", "Q4_K", "--pure"), "already quantized"),
        (("--base", f32_gguf, "--type", "Q9_K", "--pure"), "not a type"),
        (("--base", f32_gguf, "--type", "Q4_K"), "--pure"),
        (("--base", tmp_path / "missing.gguf", "--type", "Q4_K", "--pure"), "no such file"),
        (("--base", f32_gguf, "--type", "Q4_K", "--pure", "--imatrix", tmp_path / "none.gguf"), "no such file"),
        (("--base", f32_gguf, "--type", "Q4_K", "--pure", "--imatrix", junk), "legacy imatrix"),
        (("--base", f32_gguf, "--type", "Q4_K", "--pure", "--imatrix", other), "another model"),
    ]:
        rc = main(["quantize", *map(str, args), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and err.count("\n") == 1, (args, err)
        assert not out.exists() and not list(tmp_path.glob("*.partial"))
