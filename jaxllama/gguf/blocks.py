"""`Blocks`: the typed pytree leaf of a GGUF-quantized matrix kept as its blocks.

A parameter pytree holds a matrix either as a float array (Flax's `kernel [in, out]`, an
`embedding [V, D]`) or as `Blocks` in GGUF's `[out, in]` order: the products
(`model.matmul`) dispatch on that type, never on dictionary keys. Every value of a `Blocks` is
exactly `scale * q (+ offset)` per group of `group` inputs, i.e. exactly what GGUF's
dequantizer gives; how GGUF's types map onto these arrays is documented in `convert`.

Layers of different GGUF types (Q4_K_M mixes Q4_K and Q6_K) are stacked into one common form, so
a `Blocks` records the form (bits, group), not one GGUF type; `jaxllama info` lists the file's types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import lax


def pack_bits(bits: jax.Array) -> jax.Array:
    """Bits 0/1 `[..., K]` -> uint8 `[..., K/8]`, as GGUF's Q5_0 keeps fifth bits: per 32 values
    a little-endian uint32 whose bit j belongs to value j."""
    b = bits.astype(jnp.uint8).reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8)
    return jnp.sum(b << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_bits`, as uint8 0/1 `[..., K]`."""
    b = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_nibbles(q: jax.Array) -> jax.Array:
    """Values 0..15 `[..., K]` -> uint8 `[..., K/2]`, as GGUF packs Q4 blocks: per 32 values,
    16 bytes whose low nibbles hold values 0..15 and high nibbles values 16..31."""
    u = q.astype(jnp.uint8).reshape(*q.shape[:-1], q.shape[-1] // 32, 2, 16)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_nibbles`, as int8 `[..., K]`."""
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 16, 16)
    q = jnp.concatenate([b & 0x0F, b >> 4], axis=-1).astype(jnp.int8)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


#: The arrays of `Blocks`, in the order the C++ kernels take them (absent ones are None).
ARRAYS = ("q", "qh", "scale", "scale_d", "offset", "offset_d")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Blocks:
    """A quantized matrix `[..., N, K]` (a leading layer axis when stacked for `lax.scan`).

    q: int8 `[..., N, K]`, or uint8 `[..., N, K/2]` with two 4-bit values per byte (`packed`);
    qh: the fifth bits of 5-bit types, uint8 `[..., N, K/8]`, added as 16 each;
    scale, offset: per group `[..., N, K/group]` (float16 where that is exact, else float32), or
    for K-quants int8 multipliers of the float16 factors `scale_d`/`offset_d` `[..., N, K/256]`.
    layer: inside the layer scan, the traced index of the layer a product reads from the stacked
    arrays (the CPU kernel reads it in place: slicing it out would copy it).
    sharded: placed on a mesh (`parallel.shard_params`): products stay XLA's, which partition.
    """

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None = None
    qh: jax.Array | None = None
    scale_d: jax.Array | None = None
    offset_d: jax.Array | None = None
    layer: jax.Array | None = None
    sharded: bool = field(default=False, metadata={"static": True})

    @property
    def packed(self) -> bool:
        """Two 4-bit values per byte of q."""
        return self.q.dtype == jnp.uint8

    @property
    def width(self) -> int:
        """K, the input width."""
        return self.q.shape[-1] * (2 if self.packed else 1)

    @property
    def rows(self) -> int:
        """N, the output width."""
        return self.q.shape[-2]

    @property
    def group(self) -> int:
        """Inputs per scale (and offset)."""
        return self.width // self.scale.shape[-1]

    @property
    def bits(self) -> int:
        """Bits per stored value: 4, 5 or 8."""
        return 5 if self.qh is not None else 4 if self.packed else 8

    def arrays(self) -> dict[str, jax.Array]:
        """The arrays present, by name (`ARRAYS` order)."""
        return {k: getattr(self, k) for k in ARRAYS if getattr(self, k) is not None}

    def replace(self, **changes) -> Blocks:
        return dataclasses.replace(self, **changes)

    def map(self, fn) -> Blocks:
        """`fn` applied to every array present (the layer index and flags kept)."""
        return self.replace(**{k: fn(v) for k, v in self.arrays().items()})

    def at(self, layer: jax.Array | int) -> Blocks:
        """These stacked blocks, reading layer `layer` (no copy: see `layer`)."""
        return self.replace(layer=jnp.asarray(layer, jnp.int32))

    def one_layer(self) -> Blocks:
        """The blocks of layer `layer` alone (a copy); themselves when no layer is chosen."""
        if self.layer is None:
            return self
        return self.map(lambda v: lax.dynamic_index_in_dim(v, self.layer, keepdims=False)).replace(layer=None)

    def row_slice(self, start: jax.Array | int, count: int) -> Blocks:
        """Output rows `start : start + count` of (layer `layer` of) these blocks."""
        if self.layer is None:
            return self.map(lambda v: lax.dynamic_slice_in_dim(v, start, count, axis=0))
        return self.map(lambda v: lax.dynamic_slice(v, (self.layer, start, 0), (1, count, v.shape[-1]))[0]).replace(
            layer=None)

    def take(self, ids: jax.Array) -> Blocks:
        """Rows `ids` (any shape) of a 2-D matrix: an embedding lookup, before dequantizing."""
        return self.map(lambda v: jnp.take(v, ids, axis=0))

    def values(self) -> jax.Array:
        """The float32 values `[..., N, K]`: scale * q (+ offset), exactly."""
        b = self.one_layer()
        q, scale = b.q, b.group_floats("scale")  # float16 scales convert exactly
        if b.packed:
            q = unpack_nibbles(q)
        if b.qh is not None:  # 5-bit values: the fifth bits add 16
            q = q + (unpack_bits(b.qh) << 4).astype(jnp.int8)
        groups = scale.shape[-1]
        v = scale[..., None] * q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups).astype(jnp.float32)
        if b.offset is not None:
            v = v + b.group_floats("offset")[..., None]
        return v.reshape(q.shape)

    def group_floats(self, key: str) -> jax.Array:
        """`scale` or `offset` per group as float32: as stored (float32 or float16), or for
        K-quants int8 multipliers times their float16 factor per super-block (`key + "_d"`), a
        product float32 holds exactly."""
        a = getattr(self, key).astype(jnp.float32)
        d = getattr(self, f"{key}_d")
        if d is None:
            return a
        d = d.astype(jnp.float32)
        return jnp.repeat(d, a.shape[-1] // d.shape[-1], axis=-1) * a


def native_values(b: Blocks) -> jax.Array:
    """`b.values()`, as a function (a fallback the kernels call)."""
    return b.values()


def is_blocks(x: object) -> bool:
    return isinstance(x, Blocks)
