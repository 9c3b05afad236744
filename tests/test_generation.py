"""KV cache, the on-device decode loop, streaming, batches, reproducibility; greedy parity with llama.cpp."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllama
from jaxllama import InvalidInputError
from jaxllama.generation import generate, stream
from jaxllama.reference import LlamaCpp
from jaxllama.model import forward_step, init_cache
from jaxllama.generation.sampling import Sampler
from tiny_models import TinySpec

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def add(a, b):\n",
]
CHAT = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_f32(f32_gguf):
    return jaxllama.load(f32_gguf)


@pytest.fixture(scope="module")
def ref(f32_gguf):
    r = LlamaCpp(f32_gguf, n_ctx=512)
    yield r
    r.close()


@pytest.mark.parametrize("pad", [0, 5])
def test_decode_steps_equal_the_full_forward(model_f32, pad):
    toks = model_f32.tokenizer.encode(PROMPTS[1])
    full = model_f32.logits(toks)
    step = jax.jit(forward_step, static_argnames=("config",))
    cache = init_cache(model_f32.config, 1, 64)
    p = 6
    prompt = jnp.asarray([[0] * pad + toks[:p]])
    logits, cache = step(model_f32.params, prompt, cache, jnp.int32(0), jnp.asarray([pad]), model_f32.config)
    got = [np.asarray(logits[0, pad:])]
    for i in range(p, len(toks)):
        logits, cache = step(model_f32.params, jnp.asarray([[toks[i]]]), cache, jnp.int32(pad + i),
                             jnp.asarray([pad]), model_f32.config)
        got.append(np.asarray(logits[0]))
    got = np.concatenate(got)
    assert got.shape == full.shape
    # float32 rounding only: matrix-vector vs matrix-matrix products (logits reach ~30)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()


@pytest.mark.llamacpp
def test_greedy_equals_llamacpp_token_for_token(model_f32, ref):
    prompts = [ref.tokenize(p) for p in PROMPTS] + [ref.tokenize(CHAT, parse_special=True)]
    g = generate(model_f32, prompts, 40, Sampler(temperature=0.0), stop_at_eog=False)
    for prompt, ours in zip(prompts, g.tokens):
        assert len(ours) == 40
        assert ours == ref.greedy(prompt, 40)


@pytest.mark.llamacpp
def test_chat_greedy_stops_at_end_of_generation_like_llamacpp(model_f32, ref):
    prompt = ref.tokenize("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", parse_special=True)
    eog = sorted(model_f32.tokenizer.eog_ids)
    g = generate(model_f32, [prompt], 64)
    assert g.finish_reasons == ["eos"] and g.tokens[0][-1] in eog
    assert g.tokens[0] == ref.greedy(prompt, 64, stop=eog)


def test_batch_rows_equal_single_rows_and_seeds_reproduce(tiny_factory):
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    s = Sampler(temperature=0.9, top_k=20, repeat_penalty=1.2, penalty_last_n=8)
    batch = generate(m, prompts, 12, s, seed=[1, 2, 3], stop_at_eog=False)
    for prompt, seed, row in zip(prompts, [1, 2, 3], batch.tokens):
        assert generate(m, [prompt], 12, s, seed=seed, stop_at_eog=False).tokens[0] == row
    again = generate(m, prompts, 12, s, seed=[1, 2, 3], stop_at_eog=False)
    assert again.tokens == batch.tokens
    other = generate(m, prompts, 12, s, seed=[7, 8, 9], stop_at_eog=False)
    assert other.tokens != batch.tokens
    assert batch.settings["seed"] == [1, 2, 3] and batch.settings["sampler"]["repeat_penalty"] == 1.2


def test_host_prng_keys_are_jax_keys():
    """The generation state's keys, built on the host, are `jax.random.PRNGKey`'s, 64-bit mode too."""
    from jaxllama.generation.loop import prng_key

    seeds = [0, 1, 42, 2**31 - 1, 2**31, 2**32 + 5, 2**40 + 3, -1, -7]
    for x64 in (False, True):
        with jax.enable_x64(x64):
            for s in seeds:
                want = np.asarray(jax.random.PRNGKey(s))
                got = prng_key(s)
                assert got.dtype == want.dtype and np.array_equal(got, want), (x64, s, got, want)


def test_stream_yields_what_generate_returns(tiny_factory):
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))
    s = Sampler(temperature=0.8, top_p=0.9)
    timings = {}
    streamed = list(stream(m, [4, 5, 6], 10, s, seed=3, stop_at_eog=False, timings=timings))
    assert streamed == generate(m, [[4, 5, 6]], 10, s, seed=3, stop_at_eog=False).tokens[0]
    assert timings["steps"] == 9 and timings["prompt_tokens"] == 3


def test_penalties_reduce_repetition(tiny_factory):
    m = jaxllama.load(tiny_factory(TinySpec(tied=False)))
    plain = generate(m, [[1, 2, 3]], 40, Sampler(temperature=0.0), stop_at_eog=False).tokens[0]
    penal = generate(m, [[1, 2, 3]], 40, Sampler(temperature=0.0, repeat_penalty=5.0, penalty_last_n=40),
                     stop_at_eog=False).tokens[0]
    assert len(set(penal)) > len(set(plain))


@pytest.mark.parametrize(
    "prompt, n, words",
    [
        ([], 4, "empty token list"),
        (list(range(10)) * 26, 4, "exceed the context length 256"),
        ([1, 2, 3], 254, "3 prompt tokens + 254 new tokens exceed the context length 256"),
        ([1, 2, 3], 0, "max_new_tokens must be an integer >= 1"),
    ],
)
def test_bad_generation_requests(tiny_gguf, prompt, n, words):
    m = jaxllama.load(tiny_gguf)
    with pytest.raises(InvalidInputError, match=words.replace("+", "\\+")):
        generate(m, [prompt], n)


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True,
                          input=stdin)


def test_generate_cli_json(default_model):
    done = run("generate", "--prompt", "The capital of France is", "--max-new-tokens", "12",
               "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    prompt = default_model.tokenizer.encode("The capital of France is")
    assert out["tokens"] == generate(default_model, [prompt], 12).tokens[0]
    eog = default_model.tokenizer.eog_ids
    assert out["text"] == default_model.tokenizer.decode([t for t in out["tokens"] if t not in eog])
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
    assert out["seed"] == 0 and out["sampler"]["temperature"] == 0.0
    assert out["reproduce"]["model"]["sha256"] == default_model.sha256 and out["reproduce"]["tokens"] == prompt


def test_generate_cli_streams_text(tiny_gguf):
    done = run("generate", "--model", tiny_gguf, "--tokens", "5,6,7", "--max-new-tokens", "6", "--temperature", "0",
               "--ignore-eos")
    assert done.returncode == 0, done.stderr
    m = jaxllama.load(tiny_gguf)
    ids = generate(m, [[5, 6, 7]], 6, stop_at_eog=False).tokens[0]
    assert done.stdout == m.tokenizer.decode(ids) + "\n"
    assert "generated at" in done.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "temperature"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be an integer >= 0"),
        (["--min-p", "2"], "min_p must be in [0, 1]"),
        (["--max-new-tokens", "300"], "exceed the context length 256"),
    ],
)
def test_generate_cli_bad_arguments(tiny_gguf, args, words):
    done = run("generate", "--model", tiny_gguf, "--tokens", "1,2", *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("jaxllama: error:"), done.stderr
    assert words in lines[0]


def test_generate_cli_empty_prompt(tiny_gguf):
    done = run("generate", "--model", tiny_gguf, "--prompt", "")
    assert done.returncode == 1 and "empty token list" in done.stderr and "Traceback" not in done.stderr


def test_chat_cli_two_turns(default_model):
    """Both replies, exactly: each is the greedy continuation of the conversation so far."""
    tok = default_model.tokenizer
    done = run("chat", "--temperature", "0", "--max-new-tokens", "24", stdin="What is 2+2?\nAnd 3+3?\n")
    assert done.returncode == 0, done.stderr
    messages, want = [], []
    for question in ("What is 2+2?", "And 3+3?"):
        messages.append({"role": "user", "content": question})
        prompt = tok.encode(tok.apply_chat_template(messages), parse_special=True)
        ids = generate(default_model, [prompt], 24).tokens[0]
        reply = tok.decode([t for t in ids if t not in tok.eog_ids])
        messages.append({"role": "assistant", "content": reply})
        want.append(reply + "\n")
    assert done.stdout == "".join(want)
