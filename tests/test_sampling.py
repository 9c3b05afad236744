"""Samplers against the exact distributions they should draw from (chi-square), and edge cases.

The expected distributions are computed here in numpy from the definitions (llama.cpp's chain:
penalties, top-k, top-p, min-p, temperature), independently of jaxllama.sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllama import InvalidInputError
from jaxllama.generation.sampling import Sampler, filtered_logits, sample

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
N = 40_000


def expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, counts=None, rep=1.0, pres=0.0, freq=0.0):
    x = np.asarray(logits, np.float64).copy()
    if counts is not None:
        c = np.asarray(counts, np.float64)
        seen = c > 0
        x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
        x = x - c * freq - seen * pres
    keep = np.isfinite(x)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x.max()) * keep[order]
        p /= p.sum()
        mass, kept = 0.0, np.zeros_like(keep)
        for i, idx in enumerate(order):
            if mass >= top_p:
                break
            kept[idx] = keep[idx]
            mass += p[i]
        keep &= kept
    if min_p > 0:
        p = np.exp(x - x[keep].max())
        keep &= p >= min_p
    probs = np.where(keep, np.exp((x - x[keep].max()) / temperature), 0.0)
    return probs / probs.sum()


def draws(logits, s, counts=None, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), N)
    batch = jnp.broadcast_to(jnp.asarray(logits), (N, len(logits)))
    c = None if counts is None else jnp.broadcast_to(jnp.asarray(counts, jnp.float32), (N, len(logits)))
    return np.bincount(np.asarray(jax.jit(sample, static_argnums=2)(batch, keys, s, c)), minlength=len(logits))


CASES = {
    "temperature": (dict(temperature=0.7), {}),
    "hot": (dict(temperature=1.8), {}),
    "top_k": (dict(top_k=3), {}),
    "top_p": (dict(top_p=0.8), {}),
    "min_p": (dict(min_p=0.2), {}),
    "chain": (dict(temperature=0.6, top_k=5, top_p=0.9, min_p=0.1), {}),
    "penalties": (dict(repeat_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1),
                  dict(counts=[2, 0, 1, 0, 3, 0, 0, 1])),
}


@pytest.mark.parametrize("name", CASES)
def test_draws_follow_the_exact_distribution(name):
    kwargs, extra = CASES[name]
    counts = extra.get("counts")
    s = Sampler(**kwargs)
    got = draws(LOGITS, s, counts)
    want = expected(LOGITS, counts=counts, rep=s.repeat_penalty, pres=s.presence_penalty, freq=s.frequency_penalty,
                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    assert np.all(got[want == 0] == 0), "a token outside the kept set was drawn"
    support = want > 0
    p = stats.chisquare(got[support], N * want[support]).pvalue
    assert p > 1e-3, (got, N * want)


def test_expected_reference_truncates_as_documented():
    """Sanity of the numpy oracle itself on hand-checkable cases."""
    assert np.count_nonzero(expected(LOGITS, top_k=3)) == 3
    p = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    # top-p 0.8 keeps the shortest prefix reaching 0.8: here the first three tokens
    assert np.cumsum(p)[1] < 0.8 <= np.cumsum(p)[2]
    assert np.count_nonzero(expected(LOGITS, top_p=0.8)) == 3


def test_top_k_1_is_greedy():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 64)
    got = sample(jnp.asarray(logits), keys, Sampler(temperature=1.0, top_k=1))
    assert np.array_equal(np.asarray(got), logits.argmax(-1))
    greedy = sample(jnp.asarray(logits), keys, Sampler(temperature=0.0))
    assert np.array_equal(np.asarray(greedy), logits.argmax(-1))


def test_greedy_with_truncations_and_penalties_is_the_chains_argmax():
    """Greedy skips the truncations (they keep the largest logit and its ties) but not the
    penalties: the token is the lowest-id maximum of numpy's whole chain, ties included."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 40)).astype(np.float32)
    logits[::4, 7] = logits[::4, 3] = logits[::4].max(-1) + 1  # tied maxima: the lower id wins
    counts = rng.integers(0, 3, size=logits.shape).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), len(logits))
    for kw in (dict(top_k=3, top_p=0.5, min_p=0.3), dict(top_k=40, repeat_penalty=1.5, presence_penalty=0.4,
                                                         frequency_penalty=0.2)):
        got = np.asarray(sample(jnp.asarray(logits), keys, Sampler(temperature=0.0, **kw), jnp.asarray(counts)))
        pen = dict(rep=kw.get("repeat_penalty", 1.0), pres=kw.get("presence_penalty", 0.0),
                   freq=kw.get("frequency_penalty", 0.0))
        want = [int(np.argmax(expected(row, 1.0, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0),
                                       c if "repeat_penalty" in kw else None, **pen))) for row, c in zip(logits, counts)]
        assert got.tolist() == want
        if "repeat_penalty" not in kw:
            assert got[0] == 3  # a tie resolved to the lower id


def test_top_p_1_and_min_p_0_change_nothing():
    x = jnp.asarray(LOGITS)[None]
    base = np.asarray(filtered_logits(x, Sampler(temperature=0.7)))
    np.testing.assert_array_equal(np.asarray(filtered_logits(x, Sampler(temperature=0.7, top_p=1.0, min_p=0.0))), base)
    np.testing.assert_array_equal(base, np.asarray(x) / np.float32(0.7))


def test_ties():
    tied = np.array([1.0, 3.0, 3.0, 0.0], np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    assert np.asarray(sample(jnp.asarray([tied, tied]), keys, Sampler(temperature=0.0))).tolist() == [1, 1]
    got = draws(tied, Sampler(top_k=1))  # both tied maxima survive top-k 1, drawn evenly
    assert got[0] == got[3] == 0
    assert stats.binomtest(int(got[1]), N, 0.5).pvalue > 1e-3


def test_minus_inf_logits_are_never_drawn():
    x = np.array([-np.inf, 0.5, -np.inf, 0.4, -np.inf], np.float32)
    for s in (Sampler(), Sampler(top_p=0.5), Sampler(min_p=0.5), Sampler(top_k=4), Sampler(temperature=0.0)):
        got = draws(x, s)
        assert got[[0, 2, 4]].sum() == 0


def test_temperature_near_zero_is_greedy():
    got = draws(LOGITS, Sampler(temperature=1e-6))
    assert got[0] == N


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p must be in [0, 1]"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
    ],
)
def test_bad_settings(kwargs, words):
    with pytest.raises(InvalidInputError, match=words.replace("(", "\\(").replace("[", "\\[")):
        Sampler(**kwargs)
