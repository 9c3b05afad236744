"""Batches and KV caches on the mesh: rows split over "data", padded to a multiple of its size.

Padding repeats the last real row, so padded rows compute ordinary numbers (no empty masks) and
are dropped from every result; callers keep their row count and slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .mesh import mesh_sizes

@jax.tree_util.register_static
@dataclass(frozen=True)
class Placement:
    """Where a parameter pytree lives, kept at its root as `params["placement"]` by
    `rules.shard_params`: a static node (no arrays, part of the pytree's structure, so jit
    traces placed parameters apart). On a mesh the decode step's attention stays XLA's, which
    partitions, instead of the single-device CPU kernel (`model.run_model`)."""

    data: int
    model: int


def is_placed(params: Any) -> bool:
    """Whether `params` were placed on a mesh by `rules.shard_params`."""
    return isinstance(params, dict) and isinstance(params.get("placement"), Placement)


#: the layer-stacked KV cache `[L, B, S, K, d]`: rows over "data", KV heads over "model"
CACHE_SPEC = P(None, "data", None, "model", None)


def padded_rows(n: int, mesh: Mesh | None) -> int:
    """`n` rounded up to a multiple of the data size."""
    data, _ = mesh_sizes(mesh)
    return -(-n // data) * data


def pad_rows(x: Any, rows: int) -> Any:
    """`x` with its leading axis grown to `rows` by repeating its last row (numpy or jax)."""
    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    lib = np if isinstance(x, np.ndarray) else jnp
    return lib.concatenate([x, lib.repeat(x[-1:], extra, axis=0)])


def rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over "data", the rest whole (a scalar is replicated)."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))) if ndim else P())


def put_rows(mesh: Mesh | None, *arrays: Any) -> tuple[Any, ...]:
    """Each array (None passes through) padded to a multiple of the data size and split over "data";
    without a mesh, plain device arrays."""
    if mesh is None:
        return tuple(None if a is None else jnp.asarray(a) for a in arrays)
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        a = pad_rows(a, padded_rows(a.shape[0], mesh))
        out.append(jax.device_put(a, rows_sharding(mesh, np.ndim(a))))
    return tuple(out)


def put_state(mesh: Mesh | None, state: Any) -> Any:
    """A decode state (see `generation.loop.State`) on the mesh: the cache by `CACHE_SPEC`, per-row
    leaves over "data", scalars replicated. Its rows must already be a multiple of the data size."""
    if mesh is None:
        return state
    cache = jax.device_put(state.cache, NamedSharding(mesh, CACHE_SPEC))
    rest = {k: jax.device_put(v, rows_sharding(mesh, np.ndim(v))) for k, v in state._asdict().items() if k != "cache"}
    return type(state)(cache=cache, **rest)


def shardings_of(leaves: Any) -> tuple:
    """The sharding of each leaf (None for host arrays): part of a compiled program's cache key."""
    return tuple(getattr(a, "sharding", None) for a in jax.tree.leaves(leaves))
