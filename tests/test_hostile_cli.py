"""Findings of issue 24 §4, tried as a hostile user would: every argument is checked before any
work, with one line and exit 1; seeds outside what the PRNG holds are refused; a bad decode slot
is loud. Each of these failed before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import InvalidInputError
from jaxllama.cli.main import main
from jaxllama.generation import generate
from jaxllama.model import forward_step, init_cache


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf):
    import jaxllama

    return jaxllama.load(tiny_gguf)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,words", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--decode-tokens", "0"], "--decode-tokens must be in 1..4096"),
    (["--decode-tokens", "1000000000"], "--decode-tokens must be in 1..4096"),
])
def test_bench_refuses_bad_arguments_before_any_work(capsys, monkeypatch, tiny_gguf, args, words):
    import jaxllama.bench as bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("benchmarked with a bad argument"))
    code, out, err = cli(capsys, "bench", "--model", tiny_gguf, *args)
    assert code == 1 and out == "" and words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", ["4294967296", "4294967301", "-1"])
def test_generate_refuses_a_seed_the_prng_cannot_hold(capsys, monkeypatch, tiny_gguf, seed):
    import importlib

    cli_main = importlib.import_module("jaxllama.cli.main")
    monkeypatch.setattr(cli_main, "_load_model", lambda a: pytest.fail("loaded the model with a bad seed"))
    code, out, err = cli(capsys, "generate", "--model", tiny_gguf, "--tokens", "1,2", "--seed", seed)
    assert code == 1 and "seed must be an integer in 0..4294967295" in err


def test_seed_range_in_the_api_and_its_top_value_works(tiny_model):
    with pytest.raises(InvalidInputError, match="seed"):
        generate(tiny_model, [[1, 2]], 2, seed=2**32 + 5)
    top = generate(tiny_model, [[1, 2]], 3, seed=2**32 - 1)
    assert len(top.tokens[0]) >= 1


def test_save_base_into_a_directory_is_refused_before_the_base_run(capsys, monkeypatch, tmp_path, tiny_gguf):
    import jaxllama.scoring.kld as kld

    text = tmp_path / "t.txt"
    text.write_text("abc " * 400, encoding="utf-8")
    monkeypatch.setattr(kld, "kl_divergence", lambda *a, **k: pytest.fail("scored before checking --save-base"))
    code, out, err = cli(capsys, "kl-divergence", "--model", tiny_gguf, "--file", text, "--ctx", 32,
                         "--save-base", tmp_path)
    assert code == 1 and f"--save-base: {tmp_path} is a directory" in err
    assert not list(tmp_path.glob("*.partial"))
    code, out, err = cli(capsys, "kl-divergence", "--model", tiny_gguf, "--base", tmp_path, "--file", text,
                         "--ctx", 32)
    assert code == 1 and "is a directory, not a GGUF file" in err


def test_a_slot_below_minus_one_is_never_a_silently_masked_attention(tiny_model):
    c, p = tiny_model.config, tiny_model.params
    cache = init_cache(c, 1, 16)
    tokens, pad = jnp.asarray([[1, 2]]), jnp.zeros((1,), jnp.int32)
    with pytest.raises(InvalidInputError, match="outside the cache"):
        forward_step(p, tokens, cache, jnp.int32(-3), pad, c)
    traced = jax.jit(forward_step, static_argnames=("config",))
    logits, _ = traced(p, tokens, cache, jnp.int32(-3), pad, config=c)
    assert np.isnan(np.asarray(logits)).all()  # loud, where jit cannot raise
    ok, _ = traced(p, tokens, cache, jnp.int32(0), pad, config=c)
    assert np.isfinite(np.asarray(ok)).all()
