"""`jaxllama lens`, `attention` and `patch` from the command line on the default model, and the
same analyses on the real Qwen2.5 0.5B and Gemma 3 270M."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import jaxllama
from jaxllama.analysis import head_scores, logit_lens, patch_sweep

PROMPT = "The capital of France is"


def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True)


def test_lens_json_and_plot(tmp_path, default_model):
    plot = tmp_path / "lens.png"
    done = run("lens", "--prompt", PROMPT, "--target", " Paris", "--k", 3, "--ffn-inp", "--json", "--plot", plot)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    n = default_model.config.n_layer
    assert {"layers", "tokens", "target_id", "target_prob", "target_rank", "top_ids", "top_probs", "entropy",
            "kl_to_final", "reproduce"} <= set(out)
    assert out["layers"] == [i for i in range(n) for _ in (0, 1)] and out["probes"][:2] == ["ffn_inp", "l_out"]
    tokens = out["tokens"]
    assert tokens == default_model.tokenizer.encode(PROMPT)
    paris = default_model.tokenizer.encode(" Paris", add_special=False)[0]
    assert out["target_id"] == [paris] * len(tokens)
    logits = default_model.logits(tokens)[-1]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert abs(out["target_prob"][-1][-1] - p[paris]) <= 1e-5 and out["target_rank"][-1][-1] == int((p > p[paris]).sum())
    assert np.array(out["top_ids"]).shape == (2 * n, len(tokens), 3)
    assert out["reproduce"]["settings"]["target"] == paris and len(out["reproduce"]["model"]["sha256"]) == 64
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_attention_json(tmp_path):
    plot = tmp_path / "att.png"
    done = run("attention", "--prompt", PROMPT, "--layers", "0,29", "--induction-length", 16, "--json", "--plot", plot)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["layers"] == [0, 29] and set(out["kq_soft_max"]) == {"0", "29"}
    w = np.array(out["kq_soft_max"]["29"])
    t = len(out["tokens"])
    assert w.shape == (9, t, t) and np.allclose(w.sum(-1), 1, atol=1e-5) and np.abs(np.triu(w, 1)).max() == 0
    s = out["scores"]
    rep = s["induction_tokens"]
    assert np.array(s["induction"]).shape == (30, 9) and rep[-16:] == rep[-32:-16] and len(set(rep[-16:])) == 16
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_patch_json(tmp_path):
    plot = tmp_path / "patch.png"
    done = run("patch", "--clean", PROMPT, "--corrupted", "The capital of Italy is", "--answer", " Paris",
               "--wrong", " Rome", "--json", "--plot", plot)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    grid = np.array(out["grid"])
    assert {"layers", "positions", "probe", "metric_clean", "metric_corrupted", "grid", "reproduce"} <= set(out)
    assert grid.shape == (30, len(out["positions"])) and out["metric_clean"] > 0 > out["metric_corrupted"]
    # patching the whole residual stream at the changed token restores the answer in early layers,
    # at the last token in the last layers; unchanged tokens restore nothing
    changed = out["clean_tokens"].index(next(a for a, b in zip(out["clean_tokens"], out["corrupted_tokens"]) if a != b))
    assert grid[0, changed] > 0.9 and grid[-1, -1] > 0.9 and np.abs(grid[:, :changed]).max() < 1e-3
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_patch_attribution_json(default_model):
    done = run("patch", "--clean", PROMPT, "--corrupted", "The capital of Italy is", "--answer", " Paris",
               "--wrong", " Rome", "--attribution", "--compare", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    est, real = np.array(out["grid"]), np.array(out["patching_grid"])
    assert out["method"] == "attribution" and est.shape == real.shape == (30, len(out["positions"]))
    assert out["reproduce"]["settings"]["attribution"] is True
    rho = out["rank_correlation"]
    from jaxllama.analysis import rank_correlation

    assert abs(rho - rank_correlation(est, real)) < 1e-9 and rho > 0.5
    changed = out["clean_tokens"].index(next(a for a, b in zip(out["clean_tokens"], out["corrupted_tokens"]) if a != b))
    assert np.all(est[:, :changed] == 0)  # identical tokens: clean - corrupted is exactly zero there


@pytest.mark.parametrize("args, message", [
    (("patch", "--clean", PROMPT, "--corrupted", PROMPT, "--answer", " Paris", "--compare"), "--compare goes with"),
    (("lens", "--prompt", PROMPT, "--target", " Paris is"), "--target: ' Paris is' is 2 tokens, not one"),
    (("patch", "--clean", PROMPT, "--corrupted", "The capital city of Italy is", "--answer", " Paris", "--wrong",
      " Rome"), "same number of tokens"),
    (("attention", "--prompt", PROMPT, "--layers", "30"), "out of range"),
    (("patch", "--clean", PROMPT, "--corrupted", PROMPT, "--answer", " Paris", "--wrong", " Rome", "--probe", "Qcur"),
     "probe 'Qcur'"),
])
def test_bad_input_is_one_line_and_exit_1(args, message):
    done = run(*args)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout


@pytest.fixture(scope="module", params=["qwen2.5-0.5b", "gemma3-270m"])
def real_model(request):
    from jaxllama.gguf.default_model import known_model_path

    return jaxllama.load(known_model_path(request.param))


def test_the_analyses_on_real_models(real_model):
    m, c = real_model, real_model.config
    tokens = m.tokenizer.encode(PROMPT)
    lens = logit_lens(m, tokens, k=2)
    logits = m.logits(tokens)
    assert lens.target_prob.shape == (c.n_layer, len(tokens))
    assert np.array_equal(lens.top_ids[-1, :, 0], logits.argmax(-1)) and np.abs(lens.kl_to_final[-1]).max() < 1e-5
    s = head_scores(m, tokens, induction_length=8)
    assert s.direct_logit.shape == (c.n_layer, c.n_head) and s.target_id == int(logits[-1].argmax())
    paris, rome = (m.tokenizer.encode(w, add_special=False)[0] for w in (" Paris", " Rome"))
    sweep = patch_sweep(m, tokens, m.tokenizer.encode("The capital of Italy is"), paris, rome, batch=32)
    assert sweep.grid.shape == (c.n_layer, len(tokens)) and sweep.metric_clean > sweep.metric_corrupted
    assert abs(sweep.grid[-1, -1] - 1) < 1e-3 and np.abs(sweep.grid[-1, :-1]).max() < 1e-3


def test_lens_train_then_tuned_lens(tmp_path, default_model):
    """`jaxllama lens train` on a short text, then `lens --lens tuned` with what it wrote."""
    from texts import licence_text

    text = tmp_path / "train.txt"
    text.write_text(licence_text()[:6000], encoding="utf-8")
    out = tmp_path / "tuned.npz"
    done = run("lens", "train", "--file", text, "--out", out, "--steps", 8, "--ctx", 64, "--json")
    assert done.returncode == 0, done.stderr
    kl = json.loads(done.stdout)["held_out_kl"]
    assert len(kl["logit"]) == len(kl["tuned"]) == default_model.config.n_layer
    assert sum(kl["tuned"][:-1]) < sum(kl["logit"][:-1])  # 8 steps already help on the whole
    done = run("lens", "--prompt", PROMPT, "--lens", "tuned", "--translators", out, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["lens"] == "tuned" and len(got["entropy"]) == default_model.config.n_layer
    bad = run("lens", "--prompt", PROMPT, "--lens", "tuned")
    assert bad.returncode == 1 and "--translators" in bad.stderr
