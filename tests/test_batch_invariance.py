"""A prompt's logits do not depend on what it is batched with, nor on the entry point
(`logits`, `logits_batch`, `generate`'s prefill, a decode step): the matrix products choose
their kernel by tokens per row (one: the C++ matrix-vector kernel, `kernels.MAX_ROWS` rows per
call; more: XLA's product on the layer's float32 matrix), never by rows x tokens.

Decode steps run through our kernels (matrix-vector and attention) and RMSNorm sums in float64,
so their order of summation does not depend on the batch: bit for bit. Prompts run through XLA's
products and attention, whose blocking may reorder sums with the row count (measured on a 2-core
EPYC: 1 row against 2 to 64 differs by up to 6e-5 of logits about 20): within `reorder_bound`,
the float32 arithmetic's bound on reordering every sum of the forward, not a measured noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import kernels
from jaxllama.model import forward_step, init_cache
from test_parallel import reorder_bound

BATCHES = (1, 2, 8, 33, 64)


@pytest.fixture(scope="module")
def prompt(default_model):
    return default_model.tokenizer.encode("The history of the printing press begins in the fifteenth century")


def _close(a, b, c):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= reorder_bound(c) * scale, (np.abs(a - b).max(), reorder_bound(c) * scale)


def test_a_prompts_logits_whatever_its_batch(default_model, prompt):
    alone = np.asarray(default_model.logits(prompt))
    for b in BATCHES[1:]:
        rows = default_model.logits_batch([prompt] * b)
        for r in (rows[0], rows[-1]):
            _close(np.asarray(r), alone, default_model.config)


def test_prefill_agrees_with_logits_and_decode_steps_are_bit_identical_in_any_batch(default_model, prompt):
    """Prefill (through the prompt path) agrees with `logits` within the bound; a decode step from
    the same cache gives every row the same bits whatever the batch (the kernels' own order)."""
    m, c = default_model, default_model.config
    step = jax.jit(forward_step, static_argnames=("config", "last_only"))
    alone = np.asarray(m.logits(prompt + [42]))
    one = init_cache(c, 1, 32)
    first, one = step(m.params, jnp.asarray([prompt]), one, jnp.int32(0), jnp.zeros((1,), jnp.int32), config=c,
                      last_only=True)
    _close(np.asarray(first[0, 0]), alone[len(prompt) - 1], c)
    nexts = {}
    for b in BATCHES:
        cache = jax.tree.map(lambda a: jnp.repeat(a, b, axis=1), one)  # the same cache in every row
        nxt, _ = step(m.params, jnp.full((b, 1), 42), cache, jnp.int32(len(prompt)), jnp.zeros((b,), jnp.int32),
                      config=c)
        nexts[b] = np.asarray(nxt[:, 0])
        _close(nexts[b][0], alone[len(prompt)], c)  # a decode step = the same token in a prompt
    if kernels.available():  # our kernels: the same sums in the same order, whatever the batch
        for b in BATCHES:
            np.testing.assert_array_equal(nexts[b], np.broadcast_to(nexts[1][0], nexts[b].shape))
