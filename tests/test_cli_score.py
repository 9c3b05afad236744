"""`jaxllama perplexity` and `jaxllama kl-divergence`: JSON fields, progress only on a terminal, the
four typical KL uses, and one-line errors (exit 1) for bad input. Most runs call `main()` in-process
(no interpreter start per case); one of each command runs as a user would, in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import jaxllama
from jaxllama.cli.main import main
from jaxllama.scoring import kl_divergence, perplexity
from texts import licence_text
from tiny_models import TinySpec

Q8 = TinySpec(matrix_type=__import__("gguf").GGMLQuantizationType.Q8_0)  # the same weights, re-quantized


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    text = "".join(chr(33 + i) for i in np.random.default_rng(5).integers(2, 96, size=700))
    path = tmp_path_factory.mktemp("texts") / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_perplexity_json_as_a_user_runs_it(tmp_path, default_model):
    text = tmp_path / "gpl.txt"
    text.write_text(licence_text()[:5000], encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "jaxllama", "perplexity", "--file", str(text), "--ctx", "128",
                           "--chunks", "4", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # stderr is a pipe here: no progress bar
    out = json.loads(done.stdout)
    assert set(out) == {"ppl", "ppl_err", "n_tokens", "n_chunks", "tok_s", "wall_s", "compile_s", "reproduce"}
    want = perplexity(default_model, licence_text()[:5000], ctx=128, chunks=4)
    assert abs(out["ppl"] / want.ppl - 1) <= 1e-6 and abs(out["ppl_err"] / want.ppl_err - 1) <= 1e-5
    assert out["n_chunks"] == 4 and out["n_tokens"] == 512 and out["tok_s"] > 0
    r = out["reproduce"]
    assert r["model"]["sha256"] == default_model.sha256
    assert r["settings"]["ctx"] == 128 and r["settings"]["chunks"] == 4 and len(r["settings"]["file_sha256"]) == 64


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(capsys, monkeypatch, tiny_gguf, tiny_text):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = cli(capsys, "perplexity", "--model", tiny_gguf, "--file", tiny_text, "--ctx", 32, "--batch", 4)
    assert code == 0 and out.startswith("PPL = ")
    assert "perplexity" in err and "ppl " in err and "chunk" in err
    code, out, err = cli(capsys, "perplexity", "--model", tiny_gguf, "--file", tiny_text, "--ctx", 32, "--quiet")
    assert code == 0 and err == ""


def test_kl_divergence_json_and_saved_base(capsys, tmp_path, tiny_factory, tiny_text):
    f32, q8 = tiny_factory(TinySpec()), tiny_factory(Q8)
    code, out, _ = cli(capsys, "kl-divergence", "--base", f32, "--model", q8, "--file", tiny_text, "--ctx", 64,
                       "--json", "--save-base", tmp_path / "base.npz")
    assert code == 0
    r = json.loads(out)
    assert {"kld_mean", "kld_err", "kld_percentiles", "same_top_rate", "ppl_base", "ppl", "ppl_ratio",
            "delta_p", "n_chunks", "tok_s", "wall_s", "compile_s", "reproduce"} <= set(r)
    assert set(r["kld_percentiles"]) >= {"median", "90", "95", "99", "max"}
    want = kl_divergence(jaxllama.load(f32), jaxllama.load(q8), tiny_text.read_text(), ctx=64)
    assert r["kld_mean"] > 0 and abs(r["kld_mean"] / want.kld_mean - 1) <= 1e-5
    code, out, _ = cli(capsys, "kl-divergence", "--base-logprobs", tmp_path / "base.npz", "--model", q8,
                       "--file", tiny_text, "--ctx", 64, "--json")
    assert code == 0 and abs(json.loads(out)["kld_mean"] / r["kld_mean"] - 1) <= 1e-6


def test_kl_divergence_bfloat16_and_self(capsys, tiny_gguf, tiny_text):
    code, out, _ = cli(capsys, "kl-divergence", "--model", tiny_gguf, "--file", tiny_text, "--ctx", 64, "--json")
    assert code == 0 and abs(json.loads(out)["kld_mean"]) <= 1e-7  # base defaults to the same file
    code, out, _ = cli(capsys, "kl-divergence", "--model", tiny_gguf, "--dtype", "bfloat16", "--file", tiny_text,
                       "--ctx", 64, "--json")
    r = json.loads(out)
    assert code == 0 and 0 < r["kld_mean"] < 0.05 and r["reproduce"]["model"]["dtype"] == "bfloat16"


def test_kl_divergence_report_act_quant(capsys, tmp_path, default_model):
    """--act-quant alone: the same file with and without llama.cpp's activation quantization."""
    text = tmp_path / "gpl.txt"
    text.write_text(licence_text()[:3000], encoding="utf-8")
    code, out, _ = cli(capsys, "kl-divergence", "--act-quant", "--file", text, "--ctx", 128)
    assert code == 0
    assert "Mean    KLD:" in out and "Same top p:" in out and "Mean PPL(Q)/PPL(base)" in out
    mean = float(out.split("Mean    KLD:")[1].split()[0])
    assert 1e-4 < mean < 0.05


@pytest.mark.llamacpp
def test_kl_divergence_base_llamacpp(capsys, tiny_gguf, tiny_text):
    """jaxllama against llama.cpp on the same (F32) file."""
    code, out, _ = cli(capsys, "kl-divergence", "--model", tiny_gguf, "--base-llamacpp", "--file", tiny_text,
                       "--ctx", 64, "--json")
    r = json.loads(out)
    assert code == 0 and r["base"]["kind"] == "llama.cpp" and abs(r["kld_mean"]) <= 1e-5
    assert r["same_top_rate"] >= 0.99


def _bad_files(tmp):
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("abcdefgh" * 5)
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    return tmp


@pytest.mark.parametrize("args,words", [
    (["perplexity", "--file", "{tmp}/empty.txt", "--ctx", 32], "empty text"),
    (["perplexity", "--file", "{tmp}/short.txt", "--ctx", 32], "needs at least 64"),
    (["perplexity", "--file", "{text}", "--ctx", 3], "ctx must be"),
    (["perplexity", "--file", "{text}", "--ctx", 100000], "ctx must be"),
    (["perplexity", "--file", "{text}", "--ctx", 32, "--batch", 0], "--batch"),
    (["perplexity", "--file", "{text}", "--ctx", 32, "--chunks", 0], "--chunks"),
    (["perplexity", "--file", "{tmp}/missing.txt", "--ctx", 32], "no such file"),
    (["perplexity", "--file", "{tmp}/latin1.txt", "--ctx", 32], "not UTF-8"),
    (["perplexity", "--file", "{text}", "--ctx", 32, "--model", "{tmp}/missing.gguf"], "no such file"),
    (["kl-divergence", "--file", "{text}", "--ctx", 32, "--base", "{other}"], "different vocabularies"),
    (["kl-divergence", "--file", "{tmp}/empty.txt", "--ctx", 32], "empty text"),
    (["kl-divergence", "--file", "{text}", "--ctx", 32, "--base-logprobs", "{tmp}/empty.txt"], "not a base log-probs"),
])
def test_bad_input_is_one_line_exit_1(capsys, tmp_path, tiny_factory, tiny_gguf, tiny_text, args, words):
    tmp = _bad_files(tmp_path)
    other = tiny_factory(TinySpec(vocab=100))
    args = [str(a).format(tmp=tmp, text=tiny_text, other=other) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_gguf)]
    code, out, err = cli(capsys, *args)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxllama: error:") and words in lines[0], err


def test_missing_ctx_is_a_usage_error(capsys, tiny_gguf, tiny_text):
    with pytest.raises(SystemExit) as e:
        main(["perplexity", "--model", str(tiny_gguf), "--file", str(tiny_text)])
    assert e.value.code == 2


@pytest.mark.llamacpp
def test_perplexity_llamacpp_engine(capsys, tiny_gguf, tiny_text):
    """`--llamacpp`: the same method run by llama.cpp (bit-close settings) gives the same number."""
    code, out, _ = cli(capsys, "perplexity", "--model", tiny_gguf, "--file", tiny_text, "--ctx", 64, "--json",
                       "--llamacpp", "--threads", 2)
    r = json.loads(out)
    assert code == 0 and r["reproduce"]["settings"]["engine"] == "llama.cpp"
    want = perplexity(jaxllama.load(tiny_gguf), tiny_text.read_text(), ctx=64)
    assert r["n_chunks"] == want.n_chunks and abs(r["ppl"] / want.ppl - 1) <= 1e-4
