"""The sensitivity sweep and the budget mix: each measured cell equals the KL of the file that
quantization writes, computed by the ordinary scoring path; an on-grid base shows its own type as
free (the reason to use an off-grid one); the knapsack is the exact optimum."""

from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest

import jaxllama
from jaxllama.errors import InvalidInputError
from jaxllama.quant.budget import choose, parse_budget
from jaxllama.quant.sensitivity import sensitivity

GPL = "/usr/share/common-licenses/GPL-3"
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def text():
    from jaxllama.scoring.perplexity import read_text

    return read_text(GPL)


@pytest.fixture(scope="module")
def offgrid(offgrid_gguf):
    return jaxllama.load(offgrid_gguf, weights="float32")


@pytest.fixture(scope="module")
def class_sweep(offgrid, text):
    """Every kind of matrix across all layers (the embedding alone), to Q4_K and Q8_0."""
    return sensitivity(offgrid, text, ["Q4_K", "Q8_0"], "class", ctx=128, chunks=2, batch=2)


def _file_kl(base_path, base, text, tensors, qtype, tmp_path):
    """KL(base || the file quantize_file writes with `tensors` at `qtype`, the rest F32), by
    `jaxllama.kl_divergence` (whole forwards, no resuming)."""
    from jaxllama.quant.file import quantize_file

    out = tmp_path / f"cand-{qtype}-{len(tensors)}.gguf"
    res = quantize_file(base_path, out, "Q8_0", types={n: T[qtype] for n in tensors} |
                        {t.name: T.F32 for t in gguf.GGUFReader(base_path).tensors if t.name not in tensors})
    nbytes = sum(t.nbytes for t in res.tensors if t.name in tensors)
    kl = jaxllama.kl_divergence(base, jaxllama.load(out, weights="float32"), text, 128, 2)
    return kl.summary, nbytes


def test_cells_equal_the_kl_of_the_written_file(class_sweep, offgrid, offgrid_gguf, text, tmp_path):
    """The embedding (a whole forward), one kind of matrix in every layer (swapped stacks) and one
    layer resumed in the middle: the sweep's KL, top-1 and bytes are those of the file written with
    that group quantized, scored by `kl_divergence` from scratch."""
    layer = sensitivity(offgrid, text, ["Q4_K"], "layer", ctx=128, chunks=2, only=["blk.17"], estimate=False)
    cells = {(c.group, c.type): c for c in class_sweep.cells + layer.cells}
    assert len(class_sweep.cells) == 2 * 8 and len(layer.cells) == 1
    matrices = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    for group, qtype, names in (
            ("token_embd", "Q8_0", ["token_embd.weight"]),
            ("attn_v", "Q4_K", [f"blk.{i}.attn_v.weight" for i in range(offgrid.config.n_layer)]),
            ("blk.17", "Q4_K", [f"blk.17.{m}.weight" for m in matrices])):
        want, nbytes = _file_kl(offgrid_gguf, offgrid, text, names, qtype, tmp_path)
        c = cells[(group, qtype)]
        assert c.bytes == nbytes and c.kld_mean > 0
        # the same float32 weights and program pieces; only the batching of the layers differs
        assert c.kld_mean == pytest.approx(want["kld_mean"], rel=1e-3, abs=1e-7), (group, qtype)
        assert c.same_top == pytest.approx(want["same_top_rate"], abs=1 / 126 + 1e-9)
    # K-quants fall back on 576-wide rows as llama.cpp's do: only ffn_down (1536 wide) is Q4_K
    assert cells[("blk.17", "Q4_K")].types == {"Q4_K": 1, "Q5_0": 6}
    assert cells[("ffn_down", "Q4_K")].types == {"Q4_K": 30}
    assert class_sweep.rank_correlation > 0.5  # the Fisher estimate orders the cells (0.9+ measured)


def test_on_grid_base_finds_its_own_type_free(f32_gguf, text):
    """On the F32 re-export of the Q4_1 file, re-quantizing the layers to Q4_1 returns the file's own
    blocks: KL exactly 0 (which is why sweeps need an off-grid base); Q4_0 is not free."""
    base = jaxllama.load(f32_gguf, weights="float32")
    r = sensitivity(base, text, ["Q4_1", "Q4_0", "Q8_0"], "class", ctx=128, chunks=2,
                    only=["token_embd", "attn_v", "ffn_down"], estimate=False)
    for c in r.cells:
        own = "Q8_0" if c.group == "token_embd" else "Q4_1"  # the file's embedding is Q8_0
        assert (c.kld_mean == 0.0) == (c.type == own), (c.group, c.type, c.kld_mean)


def test_choose_is_the_exact_knapsack_optimum():
    rng = np.random.default_rng(0)
    options = {f"g{i}": [(t, int(rng.integers(100, 1000)), float(rng.random())) for t in ("a", "b", "c")]
               for i in range(6)}
    best = None
    for combo in itertools.product(range(3), repeat=6):
        size = sum(options[f"g{i}"][k][1] for i, k in enumerate(combo))
        kl = sum(options[f"g{i}"][k][2] for i, k in enumerate(combo))
        if size <= 3000 and (best is None or kl < best[0]):
            best = (kl, combo)
    got = choose(options, 3000, units=3000)  # one byte per unit: no rounding
    assert sum(next(o[2] for o in options[g] if o[0] == t) for g, t in got.items()) == pytest.approx(best[0])
    with pytest.raises(InvalidInputError, match="no mix fits"):
        choose(options, 500)
    assert parse_budget("4.8bpw") == parse_budget(" 4.8 ") == 4.8
    with pytest.raises(InvalidInputError):
        parse_budget("fast")


@pytest.mark.llamacpp
def test_budget_cli_writes_a_mix_within_the_budget(class_sweep, offgrid, offgrid_gguf, tmp_path, capsys):
    from jaxllama.cli import main
    from jaxllama.provenance import provenance

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({**class_sweep.to_json(), "reproduce": provenance(offgrid, None)}))
    out = tmp_path / "mix.gguf"
    assert main(["quantize", "--base", str(offgrid_gguf), "--budget", "6.2bpw", "--sweep", str(sweep),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bpw"] <= 6.2 and set(summary["budget"]["groups"].values()) == {"Q4_K", "Q8_0"}
    r = gguf.GGUFReader(out)
    assert sum(int(t.n_bytes) for t in r.tensors) * 8 / sum(int(t.n_elements) for t in r.tensors) <= 6.2
    # the mix is the best one that fits: brute force over every assignment of the 8 groups
    opts = {}
    for c in class_sweep.cells:
        opts.setdefault(c.group, []).append((c.type, c.bytes, c.kld_mean))
    fixed = sum(int(t.n_bytes) for t in r.tensors) - sum(b for g, t in summary["budget"]["groups"].items()
                                                         for tt, b, _ in opts[g] if tt == t)
    capacity = 6.2 * sum(int(t.n_elements) for t in r.tensors) / 8 - fixed
    best = min(sum(o[k][2] for o, k in zip(opts.values(), combo))
               for combo in itertools.product(range(2), repeat=len(opts))
               if sum(o[k][1] for o, k in zip(opts.values(), combo)) <= capacity)
    assert summary["budget"]["predicted_kld_sum"] == pytest.approx(best, rel=1e-9)
    # llama.cpp loads and runs the mix, and agrees with jaxllama on the same file in distribution (as the
    # other quantized files are checked: llama.cpp's 8-bit activations keep logits ~1e-2 apart)
    from jaxllama.reference import LlamaCpp

    mix = jaxllama.load(out)
    tokens = mix.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    with LlamaCpp(out, n_ctx=32) as ref:
        want = ref.logits(tokens).astype(np.float64)
    got = mix.logits(tokens).astype(np.float64)
    lw, lg = (a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
              for a in (want, got))
    assert np.mean(np.sum(np.exp(lw) * (lw - lg), axis=-1)) <= 0.02
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9
    for args, msg in [(["--budget", "2"], "smallest mix"), (["--budget", "fast"], "bits per weight"),
                      (["--budget", "5", "--type", "Q4_K"], "drop --type"), (["--budget", "5"], "--sweep")]:
        extra = ["--sweep", str(sweep)] if msg not in ("--sweep",) else []
        rc = main(["quantize", "--base", str(offgrid_gguf), *args, *extra, "--out", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and not (tmp_path / "x.gguf").exists(), (args, err)


def test_sensitivity_cli_bad_input(default_gguf, f32_gguf, capsys):
    from jaxllama.cli import main

    for args, msg in [(["--base", str(default_gguf), "--types", "Q6_K"], "already"),
                      (["--base", str(f32_gguf), "--types", "Q4_K,Q9"], "not a type"),
                      (["--base", "/nonexistent.gguf"], "no such file")]:
        rc = main(["sensitivity", *args, "--file", GPL, "--ctx", "128", "--chunks", "2"])
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and err.count("\n") == 1, (args, err)
