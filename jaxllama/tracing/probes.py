"""Named probes inside the forward: the vocabulary, the static selection, on-device statistics.

Probe names are llama.cpp's tensor names (its eval callback calls them `NAME-LAYER`), so a
jaxllama trace and a llama.cpp trace line up one to one. Each architecture has the names its
llama.cpp graph has (`LlamaConfig.layer_probes`, `.global_probes`, `.probe_order`; declared in
`gguf/architectures.py`); the dictionaries below describe every name. Shapes are for tokens
`[B, T]`; `D` width, `H`/`K` query/KV heads of size `d`, `F` feed-forward width, `V` vocabulary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ..gguf.architectures import ARCHITECTURES
from ..gguf.config import LlamaConfig
from ..errors import InvalidInputError

#: Probes inside the layers, over all architectures (each has a subset, in this order).
LAYER_PROBES: dict[str, str] = {
    "attn_norm": "RMS-normalised layer input times attn_norm weight  [B, T, D]",
    "Qcur_normed": "queries, RMS-normalised per head (QK-norm), before RoPE  [B, T, H, d]",
    "Kcur_normed": "keys, RMS-normalised per head (QK-norm), before RoPE  [B, T, K, d]",
    "Qcur": "queries after RoPE  [B, T, H, d]",
    "Kcur": "keys after RoPE  [B, T, K, d]",
    "Vcur": "values  [B, T, K, d]",
    "kqv_out": "attention result, heads merged, before the output projection  [B, T, H*d]",
    "attn_out": "after the output projection, before the residual add  [B, T, D]",
    "attn_post_norm": "the output projection RMS-normalised times post_attention_norm (Gemma)  [B, T, D]",
    "ffn_inp": "residual stream after attention (layer input + attn_out)  [B, T, D]",
    "sa_out": "residual stream after attention (layer input + attn_post_norm; Gemma)  [B, T, D]",
    "ffn_norm": "RMS-normalised residual stream times ffn_norm weight  [B, T, D]",
    "ffn_gate": "gate projection  [B, T, F]",
    "ffn_up": "up projection  [B, T, F]",
    "ffn_swiglu": "silu(ffn_gate) * ffn_up  [B, T, F]",
    "ffn_geglu": "gelu_tanh(ffn_gate) * ffn_up (Gemma)  [B, T, F]",
    "ffn_out": "down projection, before the residual add  [B, T, D]",
    "ffn_post_norm": "ffn_out RMS-normalised times post_ffw_norm (Gemma)  [B, T, D]",
    "l_out": "layer output (residual stream + feed-forward branch)  [B, T, D]",
}
#: Probes outside the layers, over all architectures.
GLOBAL_PROBES: dict[str, str] = {
    "inp_embd": "token embeddings  [B, T, D]",
    "inp_scaled": "token embeddings times sqrt(D) (Gemma)  [B, T, D]",
    "result_norm": "final RMSNorm times output_norm weight  [B, T, D]",
    "result_output": "logits  [B, T, V]",
}
#: Every name, in execution order (globals before the layers, the layers, globals after).
ALL_PROBES = {**{k: v for k, v in GLOBAL_PROBES.items() if not k.startswith("result_")}, **LAYER_PROBES,
              **{k: v for k, v in GLOBAL_PROBES.items() if k.startswith("result_")}}
#: Llama's execution order (other architectures: `LlamaConfig.probe_order`).
ORDER = ("inp_embd", *ARCHITECTURES["llama"].layer_probes, "result_norm", "result_output")

STAT_NAMES = ("rms", "mean", "std", "min", "max", "absmax", "nan", "inf")


@dataclass(frozen=True)
class Intervention:
    """Replace `probe` by `fn(value, ctx)` at `layers` (None: every layer, or a global probe).

    `ctx` holds `"layer"` (traced int, -1 outside layers), `"positions"` (`[B, T]`) and the
    values of the probes computed before this one in the same layer, e.g. `ctx["ffn_gate"]` inside `ffn_swiglu`. `fn` must be
    a JAX-traceable function; arrays it closes over become constants of the compiled program.
    """

    probe: str
    fn: Callable[[jax.Array, dict[str, Any]], jax.Array] = field(compare=True)
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ProbeSpec:
    """What the compiled forward observes: static, so a different selection compiles anew.

    stats: probes whose statistics are sent to the host by `jax.debug.callback`, one call per
      layer (and one for the global probes). Empty: the program has no callback at all.
    per_position: statistics per position `[B, T, n_stats]` instead of per row `[B, n_stats]`.
    capture: probes returned as full arrays; capture_layers limits which layers are kept
      (None: all), so memory stays bounded.
    interventions: replacements applied inside the forward (see `Intervention`).
    """

    stats: tuple[str, ...] = ()
    per_position: bool = False
    capture: tuple[str, ...] = ()
    capture_layers: tuple[int, ...] | None = None
    interventions: tuple[Intervention, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.stats or self.capture or self.interventions)


def check_probe_names(names: Iterable[str], what: str = "probe", c: LlamaConfig | None = None) -> tuple[str, ...]:
    """`names` as a tuple; `InvalidInputError` listing the valid names (of model `c`, if given)."""
    names = tuple(names)
    valid = c.probe_order if c is not None else tuple(ALL_PROBES)
    unknown = [n for n in names if n not in valid]
    if unknown:
        model = f" for {c.arch}" if c is not None else ""
        raise InvalidInputError(f"unknown {what} {unknown[0]!r}{model}; valid probes: {', '.join(valid)}")
    return names


def check_layers(layers: Iterable[int] | None, c: LlamaConfig, what: str = "layer") -> tuple[int, ...] | None:
    if layers is None:
        return None
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < c.n_layer]
    if bad:
        raise InvalidInputError(f"{what} {bad[0]} out of range; valid layers: 0..{c.n_layer - 1}")
    return tuple(sorted(set(layers)))


def validate(spec: ProbeSpec, c: LlamaConfig) -> ProbeSpec:
    """Raise `InvalidInputError` listing the valid names or layers if `spec` names others."""
    check_probe_names(spec.stats, c=c)
    check_probe_names(spec.capture, "capture probe", c)
    check_layers(spec.capture_layers, c, "capture layer")
    for iv in spec.interventions:
        check_probe_names([iv.probe], "intervention probe", c)
        check_layers(iv.layers, c, "intervention layer")
    return spec


def _plain_partials(x: jax.Array) -> tuple[jax.Array, ...]:
    """Per position: a shift c (the first element), sum and sum of squares of x - c, min, max.

    Shifting by a value of the row keeps the sums on the scale of the spread, so the variance
    does not cancel when |mean| >> spread (E[x^2] - E[x]^2 in float32 would).
    """
    c = x[..., 0]
    d = x - c[..., None]
    zero = jnp.zeros(x.shape[:-1], jnp.float32)
    return c, jnp.sum(d, -1), jnp.sum(d * d, -1), jnp.min(x, -1), jnp.max(x, -1), zero, zero


def _masked_partials(x: jax.Array) -> tuple[jax.Array, ...]:
    """`_plain_partials` over the finite values only, plus NaN and Inf counts."""
    finite = jnp.isfinite(x)
    c = jnp.where(finite[..., 0], x[..., 0], 0.0)
    d = jnp.where(finite, x - c[..., None], 0.0)
    lo = jnp.min(jnp.where(finite, x, jnp.inf), -1)
    hi = jnp.max(jnp.where(finite, x, -jnp.inf), -1)
    nan = jnp.sum(jnp.isnan(x).astype(jnp.float32), -1)
    inf = jnp.sum(jnp.isinf(x).astype(jnp.float32), -1)
    return c, jnp.sum(d, -1), jnp.sum(d * d, -1), lo, hi, nan, inf


def _finish(parts: tuple[jax.Array, ...], width: int, valid: jax.Array, per_position: bool) -> jax.Array:
    """Statistics from per-position partials; per row, positions are merged with Chan's formula
    in coordinates shifted by the row's first valid shift (again so nothing cancels)."""
    c, s1, s2, lo, hi, nan, inf = parts
    count = width - nan - inf
    n = jnp.maximum(count, 1.0)
    u = s1 / n  # the position's mean minus its shift c
    m2 = jnp.maximum(s2 - s1 * u, 0.0)  # sum of squared deviations from the position's mean
    if not per_position:
        first = jnp.argmax(valid, axis=1)[:, None]
        c_row = jnp.take_along_axis(c, first, axis=1)
        u = (c - c_row) + u  # position means relative to one shift per row
        w = valid * count
        total = jnp.maximum(jnp.sum(w, axis=1), 1.0)
        u_row = jnp.sum(w * u, axis=1) / total
        m2 = jnp.sum(valid * (m2 + count * jnp.square(u - u_row[:, None])), axis=1)
        c, u, n = c_row[:, 0], u_row, total
        nan, inf = (jnp.sum(a * valid, axis=1) for a in (nan, inf))
        lo = jnp.min(jnp.where(valid, lo, jnp.inf), axis=1)
        hi = jnp.max(jnp.where(valid, hi, -jnp.inf), axis=1)
    mean, var = c + u, m2 / n
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.stack([jnp.sqrt(var + mean * mean), mean, jnp.sqrt(var), lo, hi, absmax, nan, inf], axis=-1)


def statistics_of(xs: dict[str, jax.Array], valid: jax.Array, per_position: bool) -> dict[str, jax.Array]:
    """rms, mean, std, min, max, absmax, nan count, inf count of each x `[B, T, ...]`.

    Moments and extremes use the finite values of valid positions only; NaN and Inf are
    counted, so one bad value shows up as a count instead of hiding every statistic.
    Returns `[B, 8]` per probe, or `[B, T, 8]` with `per_position`. Boolean reductions and
    selects are slow on XLA:CPU, so the common all-finite case uses plain float reductions
    and only a group holding NaN/Inf takes the masked path (one `cond` for the group).
    """
    flat = {k: x.reshape(*x.shape[:2], -1).astype(jnp.float32) for k, x in xs.items()}
    plain = {k: _plain_partials(x) for k, x in flat.items()}
    # A NaN or Inf anywhere makes its sum of squares non-finite (so may an overflow, which
    # merely takes the exact masked path): one check per group, no extra pass over the data.
    suspect = ~jnp.all(jnp.stack([jnp.isfinite(jnp.sum(p[2])) for p in plain.values()]))
    parts = jax.lax.cond(
        suspect, lambda d, _: {k: _masked_partials(x) for k, x in d.items()}, lambda d, p: p, flat, plain
    )
    return {k: _finish(parts[k], flat[k].shape[-1], valid, per_position) for k in flat}


def statistics_numpy(x: np.ndarray) -> dict[str, float]:
    """The same statistics of one array, in float64 numpy (for tests and llama.cpp tensors)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    f = x[np.isfinite(x)]
    if f.size == 0:
        f = np.zeros(1)
    return {
        "rms": float(np.sqrt(np.mean(f * f))),
        "mean": float(f.mean()),
        "std": float(f.std()),
        "min": float(f.min()),
        "max": float(f.max()),
        "absmax": float(np.abs(f).max()),
        "nan": float(np.isnan(x).sum()),
        "inf": float(np.isinf(x).sum()),
    }


def probe_shape(name: str, c: LlamaConfig, b: int, t: int) -> tuple[int, ...]:
    """Shape of probe `name` for tokens `[b, t]`."""
    shapes = {
        "Qcur": (b, t, c.n_head, c.head_dim),
        "Kcur": (b, t, c.n_head_kv, c.head_dim),
        "Qcur_normed": (b, t, c.n_head, c.head_dim),
        "Kcur_normed": (b, t, c.n_head_kv, c.head_dim),
        "Vcur": (b, t, c.n_head_kv, c.head_dim),
        "kqv_out": (b, t, c.n_head * c.head_dim),
        "ffn_gate": (b, t, c.d_ff),
        "ffn_up": (b, t, c.d_ff),
        "ffn_swiglu": (b, t, c.d_ff),
        "ffn_geglu": (b, t, c.d_ff),
        "result_output": (b, t, c.vocab_size),
    }
    return shapes.get(name, (b, t, c.d_model))


# ---- inside the traced forward -------------------------------------------------------------

def make_tap(
    spec: ProbeSpec, layer: jax.Array, seen: dict[str, jax.Array], positions: jax.Array
) -> Callable[[str, jax.Array], jax.Array]:
    """A tap that applies `spec`'s interventions to a probe, then remembers its value in `seen`."""

    def tap(name: str, x: jax.Array) -> jax.Array:
        for iv in spec.interventions:
            if iv.probe != name:
                continue
            ctx = {"layer": layer, "positions": positions, **seen}
            new = iv.fn(x, ctx).astype(x.dtype).reshape(x.shape)
            if iv.layers is not None and name in LAYER_PROBES:
                x = jnp.where(jnp.isin(layer, jnp.asarray(iv.layers)), new, x)
            else:
                x = new
        seen[name] = x
        return x

    return tap


def capture_slots(spec: ProbeSpec, c: LlamaConfig) -> list[int]:
    """For each layer, its index among the captured layers, or -1 if not captured."""
    keep = range(c.n_layer) if spec.capture_layers is None else spec.capture_layers
    slots = [-1] * c.n_layer
    for slot, layer in enumerate(sorted(keep)):
        slots[layer] = slot
    return slots


def store_captures(bufs: dict[str, jax.Array], seen: dict[str, jax.Array], slot: jax.Array) -> dict[str, jax.Array]:
    """Write this layer's captured probes into their buffers when the layer is kept."""

    def write(buf: jax.Array, value: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), jnp.maximum(slot, 0), 0)

    return {
        name: jax.lax.cond(slot >= 0, write, lambda b, v: b, buf, seen[name]) for name, buf in bufs.items()
    }


def emit_stats(
    spec: ProbeSpec,
    layer: jax.Array,
    seen: dict[str, jax.Array],
    valid: jax.Array,
    family: dict[str, str],
    positions: jax.Array,
) -> None:
    """One `jax.debug.callback` carrying the statistics of every selected probe of `family`,
    with the positions `[B, T]` and validity `[B, T]` of the tokens they describe."""
    names = [n for n in spec.stats if n in family and n in seen]
    if not names:
        return
    stats = statistics_of({n: seen[n] for n in names}, valid, spec.per_position)
    jax.debug.callback(_deliver, layer, stats, positions, valid)


# ---- on the host ---------------------------------------------------------------------------

class _Receivers:
    """The one stack of active receivers (the `trace` recorders, innermost last).

    Process-global and guarded by a lock. Callbacks arrive on JAX runtime threads and go to the
    innermost receiver. Traces may nest, but only within one thread: entering a trace while
    another thread holds one raises, because a callback cannot tell which thread's forward it
    came from (so this is safe, not concurrent).
    """

    def __init__(self) -> None:
        self._stack: list[Any] = []
        self._owner: int | None = None
        self._lock = threading.Lock()

    def push(self, receiver: Any) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._stack and self._owner != me:
                raise InvalidInputError("jaxllama.trace() is already active in another thread; "
                                        "traces may nest, but only within one thread")
            self._stack.append(receiver)
            self._owner = me

    def remove(self, receiver: Any) -> None:
        with self._lock:
            self._stack.remove(receiver)
            if not self._stack:
                self._owner = None

    def innermost(self) -> Any | None:
        with self._lock:
            return self._stack[-1] if self._stack else None


RECEIVERS = _Receivers()


def _deliver(layer: np.ndarray, stats: dict[str, np.ndarray], positions: np.ndarray, valid: np.ndarray) -> None:
    """Host side of the callback: hand the numbers to the innermost active receiver, if any."""
    receiver = RECEIVERS.innermost()
    if receiver is not None:
        receiver(int(layer), {k: np.asarray(v) for k, v in stats.items()}, np.asarray(positions), np.asarray(valid))
