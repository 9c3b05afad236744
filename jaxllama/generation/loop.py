"""Text generation: prefill into a KV cache, then one-token decode steps, all on device.

One step function (`_step`: forward one token per row, sample, update the state) serves both
modes: `generate` runs it in a `lax.while_loop` until every row hit an end-of-generation token
or the length limit (batch use, no host round trip per token); `stream` calls it from Python
one token at a time so text can be shown as it comes. Prompts of different lengths are
left-padded into one batch; each row has its own positions, mask and PRNG key
(`fold_in(PRNGKey(seed), i)` for its i-th token), so a row generates what it would alone.
Functions are compiled ahead of time per shape, so reported speeds exclude compilation.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..gguf.config import LlamaConfig
from ..errors import InvalidInputError
from ..model import Params, cache_shape, forward_step
from ..parallel.placement import padded_rows, put_rows, put_state, shardings_of
from ..tracing.probes import ProbeSpec
from ..tracing.recorder import active_recorder
from .sampling import Sampler, sample

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this many slots (fewer compilations)

class State(NamedTuple):
    """Decode state carried between steps (a pytree)."""

    cache: dict[str, jax.Array]
    last: jax.Array  # [B] token fed at the next step
    step: jax.Array  # tokens generated so far
    out: jax.Array  # [B, max_new] generated ids, -1 after a row finished
    done: jax.Array  # [B] bool
    keys: jax.Array  # [B, 2] per-row base PRNG keys
    counts: jax.Array  # [B, V] occurrences in the penalty window ([B, 0] without penalties)
    window: jax.Array  # [B, n] ring of the last n tokens, -1 = empty ([B, 0] without penalties)
    fill: jax.Array  # [B] tokens pushed into the window so far


@dataclass(frozen=True)
class Static:
    """Everything a compiled generation function specialises on."""

    config: LlamaConfig
    sampler: Sampler
    eog: tuple[int, ...]
    prompt_len: int
    max_new: int
    act_quant: tuple | None = None
    probes: ProbeSpec | None = None  # the active trace's selection (statistics, interventions)


def _push(state: State, tok: jax.Array, vocab: int) -> State:
    """Add a token per row to the penalty window (evicting the oldest)."""
    n = state.window.shape[1]
    if n == 0:
        return state
    slot = state.fill % n
    old = jnp.take_along_axis(state.window, slot[:, None], axis=1)[:, 0]
    counts = state.counts + jax.nn.one_hot(tok, vocab) - jax.nn.one_hot(old, vocab) * (old >= 0)[:, None]
    window = state.window.at[jnp.arange(tok.shape[0]), slot].set(tok)
    return state._replace(counts=counts, window=window, fill=state.fill + 1)


def _choose(logits: jax.Array, state: State, st: Static) -> State:
    """Sample this step's token per row and record it."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, state.step)
    counts = state.counts if st.sampler.uses_penalties else None
    tok = sample(logits, keys, st.sampler, counts)
    tok = jnp.where(state.done, -1, tok)
    out = state.out.at[:, state.step].set(tok)
    hit = jnp.isin(tok, jnp.asarray(st.eog, jnp.int32)) if st.eog else jnp.zeros_like(state.done)
    state = _push(state, jnp.maximum(tok, 0), logits.shape[-1])
    return state._replace(out=out, last=jnp.maximum(tok, 0), done=state.done | hit, step=state.step + 1)


def _prefill(params: Params, tokens: jax.Array, pad: jax.Array, state: State, st: Static) -> State:
    logits, cache = forward_step(params, tokens, state.cache, jnp.int32(0), pad, st.config, st.act_quant, st.probes,
                                 last_only=True)
    return _choose(logits[:, -1], state._replace(cache=cache), st)


def _step(params: Params, pad: jax.Array, state: State, st: Static) -> State:
    """One decode step: the last token of each row in, the next token out."""
    slot = st.prompt_len + state.step - 1
    logits, cache = forward_step(params, state.last[:, None], state.cache, slot, pad, st.config, st.act_quant,
                                 st.probes)
    return _choose(logits[:, 0], state._replace(cache=cache), st)


def _loop(params: Params, pad: jax.Array, state: State, st: Static) -> State:
    def running(s: State) -> jax.Array:
        return (s.step < st.max_new) & ~jnp.all(s.done)

    return jax.lax.while_loop(running, lambda s: _step(params, pad, s, st), state)


@dataclass
class Generation:
    """Result of `generate`: generated ids per row (end token included), and timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" or "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    compile_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        steps = sum(max(len(t) - 1, 0) for t in self.tokens)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


_COMPILED: dict[Any, Any] = {}


def _compiled(name: str, fn, static: Static, *args):
    """Ahead-of-time compile `fn` for these shapes (cached), donating the decode state."""
    leaves, tree = jax.tree.flatten(args)  # the structure too: a control vector is one more leaf
    key = (name, static, tree, tuple((a.shape, a.dtype) for a in leaves), shardings_of(args))
    if key not in _COMPILED:
        donate = (len(args) - 1,)  # the state
        jitted = jax.jit(partial(fn, st=static), donate_argnums=donate)
        _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key]


def prng_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` computed on the host: threefry's key is the seed's high and low
    32 bits (the high ones 0 without 64-bit mode). Each eager `PRNGKey` compiled a program of its
    own (~2.5 MB resident and milliseconds per generation); other PRNG implementations use it."""
    if jax.config.jax_default_prng_impl != "threefry2x32":
        return np.asarray(jax.random.PRNGKey(seed))
    high = (int(seed) >> 32) & 0xFFFFFFFF if jax.config.jax_enable_x64 else 0
    return np.array([high, int(seed) & 0xFFFFFFFF], np.uint32)


def _prepare(
    rows: Sequence[Sequence[int]], c: LlamaConfig, max_new: int, sampler: Sampler, seeds: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, State]:
    if not rows:
        raise InvalidInputError("prompts: empty batch")
    if not isinstance(max_new, int) or max_new < 1:
        raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {max_new}")
    longest = max(len(r) for r in rows)
    if longest + max_new > c.context_length:
        raise InvalidInputError(
            f"max_new_tokens: {longest} prompt tokens + {max_new} new tokens exceed the context length {c.context_length}"
        )
    if sampler.uses_penalties and sampler.penalty_last_n > c.context_length:
        raise InvalidInputError(f"penalty_last_n {sampler.penalty_last_n} exceeds the context length "
                                f"{c.context_length}; the penalty window cannot be longer than the context")
    b = len(rows)
    p = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.zeros((b, p), np.int32)
    pad = np.zeros(b, np.int32)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = r
        pad[i] = p - len(r)
    n = sampler.penalty_last_n if sampler.uses_penalties else 0
    counts = np.zeros((b, c.vocab_size if n else 0), np.float32)
    window = np.full((b, n), -1, np.int32)
    fill = np.zeros(b, np.int32)
    for i, r in enumerate(rows):  # the prompt's last n tokens start the penalty window
        for tok in list(r)[-n:] if n else []:
            window[i, fill[i] % n] = tok
            counts[i, tok] += 1
            fill[i] += 1
    # built on the host and moved in one transfer: each eager jnp op here compiled a program of
    # its own (~2 MB resident and ~10 ms each in a fresh process)
    shape = cache_shape(c, b, p + max_new)  # the KV cache, init_cache's zeros built here (k and v apart)
    cache, last, step, out, done, counts, window, fill = jax.device_put(
        ({"k": np.zeros(shape, np.float32), "v": np.zeros(shape, np.float32)}, np.zeros(b, np.int32), np.int32(0),
         np.full((b, max_new), -1, np.int32), np.zeros(b, bool), counts, window, fill))
    state = State(cache=cache, last=last, step=step, out=out, done=done,
                  keys=np.stack([prng_key(s) for s in seeds]), counts=counts, window=window, fill=fill)
    return tokens, pad, state


def _placed(model: Any, rows: list[list[int]], seeds: list[int], max_new: int,
            sampler: Sampler) -> tuple[jax.Array, jax.Array, State]:
    """Prompts, pads and the initial state on the model's devices. On a mesh, rows are padded to a
    multiple of the data size (repeating the last prompt; results keep only the caller's rows),
    split over "data", and the KV cache is split by rows and KV heads (`placement.CACHE_SPEC`)."""
    mesh = getattr(model, "mesh", None)
    n = padded_rows(len(rows), mesh)
    if n > len(rows):
        rows, seeds = rows + [rows[-1]] * (n - len(rows)), seeds + [seeds[-1]] * (n - len(seeds))
    tokens, pad, state = _prepare(rows, model.config, max_new, sampler, seeds)
    tokens_d, pad_d = put_rows(mesh, tokens, pad)
    return tokens_d, pad_d, put_state(mesh, state)


def _static(model: Any, tokens: np.ndarray, max_new: int, sampler: Sampler, stop_at_eog: bool) -> Static:
    eog = tuple(sorted(model.tokenizer.eog_ids)) if stop_at_eog else ()
    rec = active_recorder()
    probes = rec.spec_for(model.config) if rec else None
    if probes is not None and probes.capture:
        raise InvalidInputError("trace(capture=...) is not supported during generation: statistics and "
                                "interventions are; capture with model.logits() on the generated tokens")
    return Static(model.config, sampler, eog, tokens.shape[1], max_new, model.act_quant, probes)


@contextmanager
def _recorded(rows: Sequence[Sequence[int]]) -> Iterator[None]:
    """Tell the active trace recorder, if any, that a generation of these prompts runs."""
    rec = active_recorder()
    if rec is None:
        yield
        return
    rec.begin_call([len(r) for r in rows])
    try:
        yield
    finally:
        rec.end_call()


SEED_LIMIT = 2**32  # threefry keys hold 32 bits of seed without jax's 64-bit mode


def check_seed(seed: Any) -> int:
    """`seed` as an int in `[0, 2**32)`; a larger one would silently equal `seed % 2**32`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise InvalidInputError(f"seed must be an integer in 0..{SEED_LIMIT - 1}, got {seed!r}")
    return int(seed)


def _seeds(seed: int | Sequence[int], b: int) -> list[int]:
    seeds = [seed] * b if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != b:
        raise InvalidInputError(f"seed: {len(seeds)} seeds for {b} prompts")
    return [check_seed(s) for s in seeds]


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: Sampler = Sampler(temperature=0.0),
    seed: int | Sequence[int] = 0,
    stop_at_eog: bool = True,
) -> Generation:
    """Generate for a batch of token-id prompts in one on-device loop (`lax.while_loop`)."""
    rows = [model.check_tokens(r, f"prompts[{i}]").tolist() for i, r in enumerate(prompts)]
    seeds = _seeds(seed, len(rows))
    tokens, pad, state = _placed(model, rows, seeds, max_new_tokens, sampler)
    st = _static(model, tokens, max_new_tokens, sampler, stop_at_eog)
    with _recorded(rows):
        t0 = time.perf_counter()
        prefill = _compiled("prefill", _prefill, st, model.params, tokens, pad, state)
        t1 = time.perf_counter()
        state = jax.block_until_ready(prefill(model.params, tokens, pad, state))
        t2 = time.perf_counter()
        loop = _compiled("loop", _loop, st, model.params, pad, state)
        t3 = time.perf_counter()
        state = jax.block_until_ready(loop(model.params, pad, state))
        t4 = time.perf_counter()
    out = np.asarray(state.out)[: len(rows)]
    gens, reasons = [], []
    for row in out:
        ids = [int(t) for t in row if t >= 0]
        gens.append(ids)
        reasons.append("eos" if ids and ids[-1] in st.eog else "length")
    return Generation(gens, reasons, sum(map(len, rows)), t2 - t1, t4 - t3, (t1 - t0) + (t3 - t2),
                      {"sampler": sampler.to_dict(), "seed": seeds, "max_new_tokens": max_new_tokens,
                       "stop_at_eog": stop_at_eog})


def stream(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler = Sampler(temperature=0.0),
    seed: int = 0,
    stop_at_eog: bool = True,
    timings: dict[str, float] | None = None,
) -> Iterator[int]:
    """Yield generated ids one at a time (same step function as `generate`, driven from Python).

    If `timings` is given it receives prefill_s, decode_s, compile_s and the token counts.
    """
    row = model.check_tokens(prompt, "prompt").tolist()
    tokens, pad, state = _placed(model, [row], [seed], max_new_tokens, sampler)
    st = _static(model, tokens, max_new_tokens, sampler, stop_at_eog)
    t = timings if timings is not None else {}
    with _recorded([row]):
        t0 = time.perf_counter()
        prefill = _compiled("prefill", _prefill, st, model.params, tokens, pad, state)
        t1 = time.perf_counter()
        state = prefill(model.params, tokens, pad, state)
        # read on the host: an eager `state.out[0, i]` compiles an indexing program first (~50 ms in a
        # fresh process, before the first token) and dispatches it each step
        tok = int(np.asarray(state.out)[0, 0])
        t2 = time.perf_counter()
        t.update(prompt_tokens=len(row), prefill_s=t2 - t1, compile_s=t1 - t0, decode_s=0.0, steps=0)
        yield tok  # before the step is compiled: the first token shows as soon as the prompt ran
        step = None
        for i in range(1, max_new_tokens):
            if bool(np.asarray(state.done)[0]):
                break
            if step is None:
                t3 = time.perf_counter()
                step = _compiled("step", _step, st, model.params, pad, state)
                t["compile_s"] += time.perf_counter() - t3
            a = time.perf_counter()
            state = step(model.params, pad, state)
            tok = int(np.asarray(state.out)[0, i])
            t["decode_s"] += time.perf_counter() - a
            t["steps"] += 1
            yield tok
