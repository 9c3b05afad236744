"""Batch scoring (jaxllama.scoring) against independent computations: float64 numpy log-softmax of
single-sequence forwards (`Model.logits`, the plain forward with its full output layer), lm-eval's
own rolling-window function, and hand-made chunks for perplexity and KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama.errors import InvalidInputError
from jaxllama.scoring import (
    SavedBase,
    compilations,
    kl_divergence,
    loglikelihood,
    loglikelihood_rolling,
    perplexity,
    token_logprobs,
)
from jaxllama.scoring import buckets
from jaxllama.scoring.kernels import kl_rows, score_rows
from texts import TEXTS, licence_text
from tiny_models import TinySpec


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def single_logits(model, ids, width=128):
    """Logits of one sequence from the plain forward (`forward_jit`, full output layer), right-padded
    to a fixed width so that every call shares one compilation."""
    tokens, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    tokens[0, : len(ids)], valid[0, : len(ids)] = ids, True
    return np.asarray(jaxllama.forward_jit(model.params, tokens, model.config, valid))[0, : len(ids)]


def direct_loglikelihood(model, ctx, cont):
    """Sum of log p(cont | ctx) from one single-sequence forward, and whether each token was the argmax."""
    lp = log_softmax(single_logits(model, list(ctx) + list(cont)))
    pos = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return lp[pos, cont].sum(), bool(np.all(lp[pos].argmax(-1) == np.asarray(cont)))


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return jaxllama.load(tiny_factory(TinySpec(context=512)))


@pytest.fixture(scope="module")
def requests(default_model):
    tok = default_model.tokenizer
    pairs = [(TEXTS[0][:200], " Historians"), ("The capital of France is", " Paris"), (TEXTS[1][:90], TEXTS[1][90:260]),
             (TEXTS[2][:40], TEXTS[2][40:120]), ("Hello", " world, how are you?")]
    return [(tok.encode(a), tok.encode(b, add_special=False)) for a, b in pairs]


@pytest.fixture(scope="module")
def one_per_batch(default_model, requests):
    stats = {}
    return loglikelihood(default_model, requests, batch_size=1, stats=stats), stats


def test_loglikelihood_equals_single_sequence_forwards(default_model, requests, one_per_batch):
    got, stats = one_per_batch
    for (ll, greedy), (ctx, cont) in zip(got, requests):
        want, want_greedy = direct_loglikelihood(default_model, ctx, cont)
        assert abs(ll - want) <= 1e-4 * abs(want)
        assert greedy == want_greedy
    assert stats["tokens"] == sum(len(c) + len(t) - 1 for c, t in requests)


def test_results_do_not_depend_on_bucket_or_batch_size(default_model, requests, one_per_batch, monkeypatch):
    """Equal to float32 summation noise: XLA's matrix products block other shapes differently, which
    moves a log-prob sum by ~1e-6 nats per token (a padding that leaked would move it by far more)."""
    base = one_per_batch[0]
    assert np.allclose([x for x, _ in loglikelihood(default_model, requests, batch_size=5)],
                       [x for x, _ in base], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(buckets, "MIN_BUCKET", 256)  # everything padded into one wide bucket
    stats = {}
    wide = loglikelihood(default_model, requests, batch_size=8, stats=stats)
    assert stats["buckets"] == [[5, 256, 256]]  # batch size capped at the number of requests
    assert np.allclose([x for x, _ in wide], [x for x, _ in base], rtol=1e-5, atol=1e-5)
    assert [g for _, g in wide] == [g for _, g in base]


def test_text_requests_split_like_lm_eval(default_model):
    """Context's trailing space moves to the continuation; ids of context+continuation are split."""
    tok = default_model.tokenizer
    (ll, _), = loglikelihood(default_model, [("The capital of France is ", "Paris")])
    whole = tok.encode("The capital of France is Paris")
    ctx = tok.encode("The capital of France is")
    want, _ = direct_loglikelihood(default_model, whole[: len(ctx)], whole[len(ctx):])
    assert abs(ll - want) <= 1e-4 * abs(want)
    (empty, _), = loglikelihood(default_model, [("", "Paris is nice")])  # empty context: the BOS token
    want, _ = direct_loglikelihood(default_model, [tok.bos_id], tok.encode("Paris is nice", add_special=False))
    assert abs(empty - want) <= 1e-4 * abs(want)


def test_is_greedy_on_constructed_continuations(tiny):
    ctx = list(np.random.default_rng(1).integers(0, 96, size=12))
    greedy = []
    for _ in range(4):  # the model's own greedy continuation, one full forward per token
        greedy.append(int(tiny.logits_batch([ctx + greedy, [0] * 16])[0][-1].argmax()))  # one padded width
    worst = int(tiny.logits_batch([ctx + greedy[:3], [0] * 16])[0][-1].argmin())
    cases = [(ctx, greedy), (ctx, greedy[:3] + [worst]), (ctx, [worst] + greedy[1:]), (ctx, greedy[:1])]
    got = [g for _, g in loglikelihood(tiny, cases)]
    assert got == [True, False, False, True]


def test_compiles_once_per_bucket(tiny):
    rng = np.random.default_rng(2)
    reqs = [(list(rng.integers(0, 96, size=n)), list(rng.integers(0, 96, size=3))) for n in (5, 6, 7, 40, 41, 9, 50)]
    before = compilations()
    stats = {}
    loglikelihood(tiny, reqs, batch_size=2, stats=stats)
    shapes = {tuple(s) for s in stats["buckets"]}
    assert shapes == {(2, 16, 16), (2, 64, 16)}  # widths 7..11 -> 16, 42..52 -> 64
    assert stats["compilations"] == 2 == compilations() - before
    assert stats["batches"] == 4  # 4 short rows -> 2 batches, 3 long rows -> 2 (one dummy row)
    loglikelihood(tiny, reqs[::-1], batch_size=2, stats=stats)
    assert stats["compilations"] == 0


def test_no_vocab_sized_array_leaves_the_device(tiny):
    """The scoring program's outputs hold no vocab axis unless the whole log-softmax is asked for."""
    c, v = tiny.config, tiny.config.vocab_size
    args = (tiny.params, jnp.zeros((4, 32), jnp.int32), jnp.ones((4, 32), bool), jnp.zeros((4, 16), jnp.int32),
            jnp.zeros((4, 16), jnp.int32))

    def out_shapes(fn, *a, **kw):
        return [x.shape for x in jax.tree.leaves(jax.eval_shape(lambda *z: fn(*z, config=c, act_quant=None, **kw), *a))]

    assert all(v not in s for s in out_shapes(score_rows, *args, top_k=5, full=False))
    assert all(v not in s for s in out_shapes(kl_rows, *args, jnp.zeros((4, 16, v)), ))
    assert (4, 16, v) in out_shapes(score_rows, *args, top_k=0, full=True)


def test_token_logprobs_and_top_k(default_model):
    ids = default_model.tokenizer.encode(TEXTS[3][:300])
    got = token_logprobs(default_model, ids, top_k=5)
    lp = log_softmax(default_model.logits(ids))
    want = lp[np.arange(len(ids) - 1), ids[1:]]
    assert np.isnan(got.logprobs[0]) and got.tokens == ids
    assert np.allclose(got.logprobs[1:], want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(got.greedy[1:], lp[:-1].argmax(-1) == np.asarray(ids[1:]))
    top = np.argsort(-lp[:-1], axis=-1)[:, :5]
    assert np.array_equal(got.top_ids[1:], top)
    assert np.allclose(got.top_logprobs[1:], np.take_along_axis(lp[:-1], top, -1), atol=1e-4)
    both = token_logprobs(default_model, [ids[:20], ids])
    assert isinstance(both, list) and np.allclose(both[1].logprobs[1:], got.logprobs[1:], atol=1e-5)
    assert np.allclose(got.surprisal[1:], -want / np.log(2), rtol=1e-4, atol=1e-4)


def test_loglikelihood_rolling_uses_lm_eval_windows(tiny):
    """Same windows as lm-eval's get_rolling_token_windows + make_disjoint_window, each window one forward."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = np.random.default_rng(3)
    texts = [list(map(int, rng.integers(2, 96, size=n))) for n in (50, 16, 5)]
    got = loglikelihood_rolling(tiny, texts, max_length=16)
    prefix = tiny.tokenizer.bos_id
    for total, ids in zip(got, texts):
        want = 0.0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, 16, 1)):
            inp = (ctx + cont)[-17:][:-1]
            lp = log_softmax(tiny.logits(inp))
            want += lp[np.arange(len(inp) - len(cont), len(inp)), cont].sum()
        assert abs(total - want) <= 1e-4 * abs(want)
    text = "".join(chr(33 + i) for i in texts[0][:30])  # a text: tokenized without BOS, prefix added
    (whole,) = loglikelihood_rolling(tiny, [text])
    lp = log_softmax(tiny.logits([prefix] + texts[0][:29]))
    assert abs(whole - lp[np.arange(30), texts[0][:30]].sum()) <= 1e-4 * abs(whole)


def manual_perplexity(model, tokens, ctx, n_chunks, bos=None):
    """llama-perplexity's method written out: chunk, BOS first, score ctx/2..ctx-2, float64 mean."""
    nll = []
    for i in range(n_chunks):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        inp = ([bos] + chunk[1:]) if bos is not None else chunk
        lp = log_softmax(model.logits(inp))
        nll += [-lp[j, chunk[j + 1]] for j in range(ctx // 2, ctx - 1)]
    nll = np.asarray(nll)
    ppl = np.exp(nll.mean())
    return ppl, ppl * np.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1))


def test_perplexity_chunks_on_a_text_that_is_not_a_multiple_of_ctx(default_model):
    text = licence_text()[:6000]
    tokens = default_model.tokenizer.encode(text)
    assert len(tokens) % 64 and len(tokens) // 64 > 5
    r = perplexity(default_model, text, ctx=64, chunks=5, batch_size=2)  # 3 batches, the last one padded
    want, want_err = manual_perplexity(default_model, tokens, 64, 5)
    assert r.n_chunks == 5 and r.n_tokens == 320 and r.nll.shape == (5, 31)
    assert abs(r.ppl / want - 1) <= 1e-5 and abs(r.ppl_err / want_err - 1) <= 1e-4
    full = perplexity(default_model, tokens, ctx=64)  # token ids in; every whole chunk
    assert full.n_chunks == len(tokens) // 64
    # another batch shape: XLA blocks the matrix products differently; float32 noise, measured 5e-5
    assert np.allclose(full.nll[:5], r.nll, rtol=1e-4, atol=2e-4)


def test_perplexity_replaces_each_chunks_first_token_by_bos(tiny_factory):
    model = jaxllama.load(tiny_factory(TinySpec(add_bos=True)))
    text = "".join(chr(33 + i) for i in np.random.default_rng(4).integers(2, 96, size=100))
    tokens = model.tokenizer.encode(text)
    assert tokens[0] == model.tokenizer.bos_id == 0
    r = perplexity(model, text, ctx=16)
    want, _ = manual_perplexity(model, tokens, 16, len(tokens) // 16, bos=0)
    assert abs(r.ppl / want - 1) <= 1e-5
    wrong, _ = manual_perplexity(model, tokens, 16, len(tokens) // 16)
    assert abs(wrong / want - 1) > 1e-3  # the rule matters here


def test_kl_of_a_run_against_itself_is_zero(default_model):
    r = kl_divergence(default_model, default_model, licence_text()[:4000], ctx=64, chunks=3)
    assert np.abs(r.kld).max() <= 1e-6 and r.same_top_rate == 1.0
    assert abs(r.ppl_ratio - 1) <= 1e-6 and abs(r.ppl - r.ppl_base) <= 1e-5 * r.ppl


def test_kl_f32_vs_requantized_equals_numpy(f32_gguf, q8_0_gguf, tmp_path):
    base, model = jaxllama.load(f32_gguf), jaxllama.load(q8_0_gguf)
    text = licence_text()[:5000]
    r = kl_divergence(base, model, text, ctx=128, chunks=3, save_base=tmp_path / "base.npz")
    tokens = model.tokenizer.encode(text)
    kld, nll, nll_base, same = [], [], [], []
    for i in range(3):
        chunk = tokens[i * 128:(i + 1) * 128]
        lp_b, lp_m = log_softmax(base.logits(chunk))[64:127], log_softmax(model.logits(chunk))[64:127]
        kld += list((np.exp(lp_b) * (lp_b - lp_m)).sum(-1))
        nll += list(-lp_m[np.arange(63), chunk[65:]])
        nll_base += list(-lp_b[np.arange(63), chunk[65:]])
        same += list(lp_b.argmax(-1) == lp_m.argmax(-1))
    kld = np.asarray(kld)
    assert kld.mean() > 1e-4  # a real difference to measure
    assert np.allclose(r.kld.ravel(), kld, rtol=1e-3, atol=2e-5)  # float32 logits of two programs
    assert abs(r.kld_mean / kld.mean() - 1) <= 1e-3
    assert abs(r.kld_percentiles["99"] / np.percentile(kld, 99) - 1) <= 1e-3
    assert r.same_top_rate == np.mean(same)
    assert abs(r.ppl / np.exp(np.mean(nll)) - 1) <= 1e-5 and abs(r.ppl_base / np.exp(np.mean(nll_base)) - 1) <= 1e-5
    again = kl_divergence(SavedBase(tmp_path / "base.npz"), model, text, ctx=128, chunks=3)
    assert np.allclose(again.kld, r.kld, atol=1e-7)
    with pytest.raises(InvalidInputError, match="another text"):
        kl_divergence(SavedBase(tmp_path / "base.npz"), model, licence_text()[100:5100], ctx=128, chunks=3)


@pytest.mark.parametrize("call,words", [
    (lambda m: loglikelihood(m, [("abc", "")]), "empty continuation"),
    (lambda m: loglikelihood(m, [([3, 4], [])]), "empty continuation"),
    (lambda m: loglikelihood(m, []), "empty list"),
    (lambda m: loglikelihood(m, [("abc", [3])]), "both be text or both token ids"),
    (lambda m: loglikelihood(m, [("abc", "d")], batch_size=0), "batch size"),
    (lambda m: loglikelihood(m, [("abc", "d")], batch_size=-2), "batch size"),
    (lambda m: perplexity(m, "", ctx=16), "empty text"),
    (lambda m: perplexity(m, "abcdefgh" * 3, ctx=16), "needs at least 32"),
    (lambda m: perplexity(m, "abcdefgh" * 30, ctx=3), "ctx must be"),
    (lambda m: perplexity(m, "abcdefgh" * 30, ctx=100_000), "ctx must be"),
    (lambda m: perplexity(m, "abcdefgh" * 30, ctx=16, batch_size=0), "batch size"),
    (lambda m: perplexity(m, "abcdefgh" * 30, ctx=16, chunks=0), "chunks"),
    (lambda m: token_logprobs(m, [5]), "at least 2 tokens"),
    (lambda m: token_logprobs(m, [5, 500]), "outside"),
])
def test_bad_scoring_input_raises_typed_one_line_errors(tiny, call, words):
    with pytest.raises(InvalidInputError, match=words) as e:
        call(tiny)
    assert "\n" not in str(e.value)


def test_kl_refuses_models_with_different_vocabularies(tiny, default_model):
    with pytest.raises(InvalidInputError, match="different vocabularies"):
        kl_divergence(tiny, default_model, licence_text()[:3000], ctx=64)


def test_reading_text_files(tmp_path):
    from jaxllama.scoring.perplexity import read_text

    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(InvalidInputError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "ok.txt").write_text("grüße", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "grüße"


SAVED_BASE_RUN = """
import json, sys, jax, jaxllama
from jaxllama.bench import peak_rss_mb
from jaxllama.scoring import kl_divergence
from jaxllama.scoring.kld import SavedBase
model = jaxllama.load(sys.argv[1])
text = open(sys.argv[2]).read()
if sys.argv[3] == "save":
    kl_divergence(model, model, text, ctx=128, save_base=sys.argv[4])
else:
    kl_divergence(SavedBase(sys.argv[4]), model, text, ctx=128, chunks=2, batch_size=1)  # compiled and warm
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM starts again from here (Linux)
    before = peak_rss_mb("VmRSS")
    r = kl_divergence(SavedBase(sys.argv[4]), model, text, ctx=128, batch_size=1)
    print(json.dumps([before, peak_rss_mb("VmHWM"), r.kld.size, float(abs(r.kld).max())]))
"""


def test_a_saved_base_is_read_a_batch_at_a_time(tiny_factory, tmp_path):
    """KL against a saved base of a large vocabulary over 4,096 tokens: the scoring process's
    memory does not grow with the base file (255 MiB here; it was read whole), which is read a
    batch of rows at a time."""
    import json
    import os
    import subprocess
    import sys

    path = tiny_factory(TinySpec(vocab=32768, context=1024), 23)
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(33 + i) for i in np.random.default_rng(3).integers(0, 94, 4200)), encoding="utf-8")
    base = tmp_path / "base.npz"
    env = {**os.environ, "JAXLLAMA_CACHE": str(tmp_path / "cache")}
    for step in ("save", "score"):
        done = subprocess.run([sys.executable, "-c", SAVED_BASE_RUN, str(path), str(text), step, str(base)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    before, peak, n, worst = json.loads(done.stdout.strip().splitlines()[-1])
    size_mb = base.stat().st_size / 2**20
    assert size_mb > 250 and n == 32 * 63
    assert worst < 1e-5  # the same model on both sides: the saved rows were read back where they lie
    # one chunk's rows and their log-softmax (a few times 128 x 32768 floats), not the file
    assert peak - before < 0.6 * size_mb, (before, peak, size_mb)  # measured 0.32; read whole: > 1
