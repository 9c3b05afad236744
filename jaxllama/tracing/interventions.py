"""Ready-made interventions: replace a probe by a function of itself inside the jitted forward.

    with jaxllama.trace(interventions=[swap_swiglu(layers=[0])]) as rec:
        model.logits(tokens)        # "what if SwiGLU were gate * silu(up) in layer 0?"

Each returns an `Intervention`; pass a list to `trace(interventions=...)` or build a
`ProbeSpec(interventions=...)` for `forward`. Layers default to all layers.
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from ..errors import InvalidInputError
from .probes import Intervention


def _layers(layers: Iterable[int] | None) -> tuple[int, ...] | None:
    return None if layers is None else tuple(int(i) for i in layers)


def zero(probe: str, layers: Iterable[int] | None = None) -> Intervention:
    """Replace `probe` by zeros (ablation)."""
    return Intervention(probe, lambda x, ctx: x * 0.0, _layers(layers))


def scale(probe: str, factor: float, layers: Iterable[int] | None = None) -> Intervention:
    """Multiply `probe` by `factor`."""
    f = float(factor)
    return Intervention(probe, lambda x, ctx: x * f, _layers(layers))


def patch(probe: str, value: np.ndarray, layers: Iterable[int] | None = None) -> Intervention:
    """Replace `probe` by a fixed array (e.g. one captured from another prompt), broadcast to its shape."""
    v = np.asarray(value, dtype=np.float32)
    return Intervention(probe, lambda x, ctx: jax.numpy.broadcast_to(v, x.shape), _layers(layers))


def swap_swiglu(layers: Iterable[int] | None = None) -> Intervention:
    """Use `ffn_gate * silu(ffn_up)` instead of `silu(ffn_gate) * ffn_up` (a classic port bug)."""
    return Intervention("ffn_swiglu", lambda x, ctx: ctx["ffn_gate"] * jax.nn.silu(ctx["ffn_up"]), _layers(layers))


def add(probe: str, vector: np.ndarray, strength: float = 1.0, layers: Iterable[int] | None = None) -> Intervention:
    """Add `strength * vector` to `probe` (steering): `vector` is one `[X]` for every chosen layer, or
    `[n_layer, X]`, one row per layer (row `layer` at that layer)."""
    s = float(strength)
    if not np.isfinite(s):
        raise InvalidInputError(f"add: strength must be finite, not {strength}")
    v = np.asarray(vector, dtype=np.float32) * np.float32(s)
    if not np.isfinite(v).all():
        raise InvalidInputError("add: the vector holds NaN or Inf")
    if v.ndim == 1:
        return Intervention(probe, lambda x, ctx: x + v, _layers(layers))
    if v.ndim != 2:
        raise InvalidInputError(f"add: vector must be [X] or [n_layer, X], not shape {v.shape}")
    return Intervention(probe, lambda x, ctx: x + jax.numpy.asarray(v)[ctx["layer"]], _layers(layers))
