"""GGUF tensors -> a Flax parameter pytree with per-layer weights stacked for `lax.scan`.

Layout (`L` layers, `D` width, `F` feed-forward width, `H`/`K` query/KV heads of size `d`,
`V` vocabulary); matrices use Flax's `Dense` convention, `kernel[in, out]`, so `y = x @ kernel`:

    {"params": {
        "token_embd":  {"embedding": [V, D]},
        "layers": {
            "attn_norm":   {"scale":  [L, D]},
            "attn_q":      {"kernel": [L, D, H*d]},
            "attn_k":      {"kernel": [L, D, K*d]},
            "attn_v":      {"kernel": [L, D, K*d]},
            "attn_output": {"kernel": [L, H*d, D]},
            "ffn_norm":    {"scale":  [L, D]},
            "ffn_gate":    {"kernel": [L, D, F]},
            "ffn_up":      {"kernel": [L, D, F]},
            "ffn_down":    {"kernel": [L, F, D]},
        },
        "output_norm": {"scale":  [D]},
        "output":      {"kernel": [D, V]},          # only when not tied to token_embd
        "rope":        {"freq_factors": [rope_dim // 2]},  # only with a rope_freqs tensor
    }}

and, where the architecture and file have them (see `LlamaConfig`): `"bias"` leaves next to
`attn_q`/`attn_k`/`attn_v` (`[L, H*d]`, `[L, K*d]`), `attn_output` (`[L, D]`) and `output`
(`[V]`); `attn_q_norm`/`attn_k_norm` `{"scale": [L, d]}` (QK-norm);
`post_attention_norm`/`post_ffw_norm` `{"scale": [L, D]}` (sandwich norms).

Q and K rows keep GGUF's order (the HF->GGUF converter permuted Llama's so that RoPE rotates
adjacent pairs). Norm scales and biases stay float32; matrices and the embedding take `dtype`.

Weight layouts (`weights=`): "float32" and "bfloat16" hold matrices as above. "native" (the
default) keeps each quantized GGUF matrix as its blocks, a typed leaf `Blocks` in place of the
`kernel` (or `embedding`) array, in GGUF's `[out, in]` order: `Blocks(q=int8 [L, N, K],
scale=float32 [L, N, K/g], offset=float32 [L, N, K/g])` (offset only where the type has one), every value exactly `scale * q + offset`, i.e. exactly what the
float32 layout holds, at a quarter of its size (scale and offset are float16 wherever every one
of them is a float16 value, as GGUF's own Q8_0/Q4_x/Q5_x scales are, else float32: `half_scales`);
the embedding likewise (`[V, D]`, which is also the tied output matrix). Types of at most 4 bits (`PACKED_QMIN`: Q4_0, Q4_1, Q4_K, Q3_K, Q2_K)
keep two values per byte instead, as GGUF does: `q` uint8 `[L, N, K/2]` (`pack_nibbles`), the
values shifted to 0..15 with the shift moved into `offset`, still exactly the same values. F32/F16/BF16 matrices stay float32 kernels in every layout.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Container

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from .blocks import ARRAYS, Blocks, native_values, pack_bits, pack_nibbles, unpack_bits, unpack_nibbles  # noqa: F401
from .config import LlamaConfig
from .dequant import AFFINE, KERNELS, TWO_LEVEL, affine_blocks, dequantize_blocks, dequantize_numpy, two_level_blocks
from ..errors import InvalidInputError, UnsupportedModelError
from .reader import GGUFFile

Params = dict[str, Any]

#: The matrices of one layer, in the order the forward uses them.
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
#: Every matrix a forward multiplies by: the layer matrices and the output (`token_embd` when tied).
MATRICES = LAYER_MATRICES + ("output",)


def matrix_tensors(short: str, n_layer: int, names: Container[str]) -> list[str]:
    """The GGUF tensors of matrix `short` (one of `MATRICES`) among `names`: its weight in every
    layer, or for "output" `output.weight`, else the tied `token_embd.weight`."""
    if short == "output":
        return ["output.weight" if "output.weight" in names else "token_embd.weight"]
    return [f"blk.{i}.{short}.weight" for i in range(n_layer)]


#: Storage dtypes of matrices and the embedding; arithmetic is float32 either way.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
#: Weight layouts: "native" keeps GGUF's quantized blocks (exact values, int8 + scales), the
#: float ones dequantize. "auto" is the fastest exact layout: native.
WEIGHTS = ("auto", "native", "float32", "bfloat16")
#: The arrays of a native matrix (`Blocks`).
NATIVE_KEYS = ARRAYS


def check_dtype(dtype: str) -> Any:
    """The jnp dtype named `dtype`, or `InvalidInputError` listing the valid names."""
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype: must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def check_weights(weights: str, what: str = "weights") -> str:
    """The layout named `weights` ("auto" resolved), or `InvalidInputError` listing the valid ones."""
    if weights not in WEIGHTS:
        raise InvalidInputError(f"{what}: must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    return "native" if weights == "auto" else weights


#: Types whose q spans at most 16 values, from this minimum: their native q is packed two per byte.
PACKED_QMIN = {
    GGMLQuantizationType.Q4_0: -8,
    GGMLQuantizationType.Q4_1: 0,
    GGMLQuantizationType.Q4_K: 0,
    GGMLQuantizationType.Q3_K: -4,
    GGMLQuantizationType.Q2_K: 0,
}


#: 5-bit types, from this minimum: their native q is packed as 4-bit values plus a plane of fifth bits.
FIVE_BIT_QMIN = {
    GGMLQuantizationType.Q5_0: -16,
    GGMLQuantizationType.Q5_1: 0,
    GGMLQuantizationType.Q5_K: 0,
}


def _shift_to_unsigned(part: tuple[jax.Array, jax.Array, jax.Array | None], qmin: int) -> tuple:
    """(q, scale, offset) -> (q - qmin, scale, offset + qmin * scale): every value unchanged.

    Exact in float32: qmin is 0 or a small power of two (-4, -8, -16) and those types have no offset,
    so qmin * scale is exact, and scale * (q - qmin) + qmin * scale rounds to the exact value
    scale * q, which float32 represents (scale has at most 17 significant bits here). Only a
    zero's sign can change (-0.0 becomes 0.0), which no sum of products can tell.
    """
    q, scale, offset = part
    if qmin == 0:
        return part
    return q - jnp.int8(qmin), scale, scale * np.float32(qmin) if offset is None else offset + scale * np.float32(qmin)


def is_native(leaf: Any) -> bool:
    """A matrix kept as GGUF blocks (`Blocks`)."""
    return isinstance(leaf, Blocks)


def convert_params(params: Params, weights: str) -> Params:
    """`params` in layout `weights`: float layouts dequantize native leaves (exactly) and store
    every kernel and the embedding as that dtype (norms and biases stay float32); "native"
    keeps native leaves as they are (float leaves cannot be re-quantized exactly)."""
    layout = check_weights(weights)
    if layout == "native":
        return params
    target = DTYPES[layout]

    def walk(node: Any, key: str | None) -> Any:
        if isinstance(node, Blocks):
            values = node.values()
            return values.astype(target) if key == "embedding" else jnp.swapaxes(values, -1, -2).astype(target)
        if isinstance(node, dict):
            return {k: (v.astype(target) if k in ("kernel", "embedding") and not is_native(v) else walk(v, k))
                    for k, v in node.items()}
        return node

    return walk(params, None)


def tensor_table(c: LlamaConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every GGUF tensor a model of config `c` needs: its numpy-order shape and its pytree path
    (per-layer tensors stack under `("layers", short, leaf)`)."""
    q, kv, d = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.d_model
    table: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "token_embd.weight": ((c.vocab_size, d), ("token_embd", "embedding")),
        "output_norm.weight": ((d,), ("output_norm", "scale")),
    }
    if not c.tied_output:
        table["output.weight"] = ((c.vocab_size, d), ("output", "kernel"))
    if c.output_bias:
        table["output.bias"] = ((c.vocab_size,), ("output", "bias"))
    if c.has_rope_freqs:
        table["rope_freqs.weight"] = ((c.rope_dim // 2,), ("rope", "freq_factors"))
    layer: dict[tuple[str, str], tuple[int, ...]] = {
        ("attn_norm", "weight"): (d,),
        ("attn_q", "weight"): (q, d),
        ("attn_k", "weight"): (kv, d),
        ("attn_v", "weight"): (kv, d),
        ("attn_output", "weight"): (d, q),
        ("ffn_norm", "weight"): (d,),
        ("ffn_gate", "weight"): (c.d_ff, d),
        ("ffn_up", "weight"): (c.d_ff, d),
        ("ffn_down", "weight"): (d, c.d_ff),
    }
    if c.qkv_bias:
        layer.update({("attn_q", "bias"): (q,), ("attn_k", "bias"): (kv,), ("attn_v", "bias"): (kv,)})
    if c.out_bias:
        layer[("attn_output", "bias")] = (d,)
    if c.qk_norm:
        layer.update({("attn_q_norm", "weight"): (c.head_dim,), ("attn_k_norm", "weight"): (c.head_dim,)})
    if c.post_norms:
        layer.update({("post_attention_norm", "weight"): (d,), ("post_ffw_norm", "weight"): (d,)})
    for (short, suffix), shape in layer.items():
        leaf = "bias" if suffix == "bias" else ("kernel" if short in LAYER_MATRICES else "scale")
        for i in range(c.n_layer):
            table[f"blk.{i}.{short}.{suffix}"] = (shape, ("layers", short, leaf))
    return table


def _check_tensors(f: GGUFFile, c: LlamaConfig) -> None:
    expected = tensor_table(c)
    for name, (shape, _) in expected.items():
        if name not in f.tensors:
            raise UnsupportedModelError(f"{f.path}: missing tensor {name!r}")
        if f.tensors[name].shape != shape:
            raise UnsupportedModelError(
                f"{f.path}: tensor {name!r} has shape {list(f.tensors[name].shape)}, expected {list(shape)}"
            )
    extra = sorted(set(f.tensors) - set(expected))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UnsupportedModelError(f"{f.path}: unsupported tensors for {c.arch}: {', '.join(extra[:3])}{more}")


def _raw(f: GGUFFile, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A tensor's bytes and the type a JAX kernel reads them as (fallback types pre-decoded to F32)."""
    info = f.tensors[name]
    raw = f.raw(name)
    if info.ggml_type in KERNELS:
        return raw, info.ggml_type
    values = dequantize_numpy(raw, info.ggml_type, f"{f.path}: tensor {name!r}")
    return values.view(np.uint8), GGMLQuantizationType.F32


def _stack_native(parts: list[dict[str, jax.Array | None]], order: list[int]) -> dict[str, jax.Array]:
    """Native parts of several layer groups (`{"q", "scale", "offset"}`, K-quants' two levels also
    `"scale_d"`, `"offset_d"`; None where a type has none) -> one leaf in layer order.

    Groups of different types are brought to the finest group size (a scale or multiplier
    repeated is the same one) and, if any has offsets, zero offsets (and zero factors) for the
    others; factors are float16, which they are. Every value is unchanged.
    """
    groups = max(p["scale"].shape[-1] for p in parts)
    keys = [k for k in ("q", "scale", "scale_d", "offset", "offset_d") if any(p.get(k) is not None for p in parts)]
    cols: dict[str, list[jax.Array]] = {k: [] for k in keys}
    for p in parts:
        reps = groups // p["scale"].shape[-1]
        cols["q"].append(p["q"])
        cols["scale"].append(jnp.repeat(p["scale"], reps, axis=-1))
        if "scale_d" in cols:
            cols["scale_d"].append(p["scale_d"].astype(jnp.float16))
        if "offset" in cols:
            off = p.get("offset")
            cols["offset"].append(jnp.zeros_like(cols["scale"][-1]) if off is None else jnp.repeat(off, reps, axis=-1))
        if "offset_d" in cols:
            d = p.get("offset_d")
            cols["offset_d"].append(jnp.zeros_like(cols["scale_d"][-1]) if d is None else d.astype(jnp.float16))
    back = jnp.argsort(jnp.array(order))
    return {k: (v[0] if len(v) == 1 else jnp.concatenate(v)[back]) for k, v in cols.items()}


@partial(jax.jit, static_argnames=("spec", "dtype", "native"))
def _convert(raws: dict[str, list[jax.Array]], spec: tuple, dtype: Any, native: bool) -> dict[str, jax.Array]:
    """Dequantize (or, with `native`, decompose into q/scale/offset), stack, transpose and cast
    everything in one compiled program.

    Keys are '/'-joined parameter paths. `spec` holds, per path, `(kind, ((type, layer indices), ...))`; each group of
    layers of one type is converted in one batch, then groups are put back in layer order. A
    native matrix stays in GGUF's `[out, in]` order; a float `kernel` is transposed to `[in, out]`.
    """
    out: Params = {}
    for path, kind, groups in spec:
        if native and kind in ("kernel", "embedding") and all(t in AFFINE for t, _ in groups):
            qmin = {**PACKED_QMIN, **FIVE_BIT_QMIN}
            packed = all(t in qmin for t, _ in groups)
            order = [i for _, layers in groups for i in layers]
            if all(t in TWO_LEVEL for t, _ in groups):  # K-quants: int8 multipliers of float16 factors
                # (Q2_K, Q4_K and Q5_K are 0.., Q6_K signed int8: no shift to make)
                keys = ("q", "scale", "scale_d", "offset", "offset_d")
                parts = [dict(zip(keys, two_level_blocks(raw, t))) for (t, _), raw in zip(groups, raws[path])]
            else:
                parts = [affine_blocks(raw, t) for (t, _), raw in zip(groups, raws[path])]
                if packed:
                    parts = [_shift_to_unsigned(part, qmin[t]) for (t, _), part in zip(groups, parts)]
                parts = [dict(zip(("q", "scale", "offset"), part)) for part in parts]
            stacked = _stack_native(parts, order)
            five = any(t in FIVE_BIT_QMIN for t, _ in groups)
            if five and stacked["q"].shape[-1] // stacked["scale"].shape[-1] != 32:
                packed = False  # 5-bit planes in groups of 32 only (the kernels'): int8 (0..31) instead
            if packed and five:  # 4-bit values plus a plane of fifth bits, in the GGUF file's bytes
                stacked["qh"] = pack_bits(stacked["q"] >> 4)
                stacked["q"] = stacked["q"] & 15
            if packed:
                stacked["q"] = pack_nibbles(stacked["q"])
            out.update({f"{path}/{k}": v for k, v in stacked.items()})
            continue
        parts, order = [], []
        for (ggml_type, layers), raw in zip(groups, raws[path]):
            parts.append(dequantize_blocks(raw, ggml_type))
            order.extend(layers)
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts)[jnp.argsort(jnp.array(order))]
        if kind == "kernel":
            x = jnp.swapaxes(x, -1, -2).astype(dtype)
        elif kind == "embedding":
            x = x.astype(dtype)
        out[path] = x
    return out


def params_from_gguf(f: GGUFFile, c: LlamaConfig, weights: str = "float32") -> Params:
    """Convert the tensors of `f` into the parameter pytree documented above, in layout `weights`."""
    layout = check_weights(weights)
    target = DTYPES.get(layout, jnp.float32)
    _check_tensors(f, c)
    by_path: dict[tuple[str, ...], list[str]] = {}
    for name, (_, path) in tensor_table(c).items():
        by_path.setdefault(path, []).append(name)  # per-layer names arrive in layer order

    # One leaf at a time, small ones together: only one large leaf's raw bytes (read from the
    # memory-mapped file) and temporaries exist next to the converted leaves, so a load's peak
    # memory is the converted model plus about one leaf, not twice the file.
    # A file under STREAM_ABOVE is converted by one program (fewer compilations: the default
    # model's process then holds ~30 MB less after its load).
    stream = sum(t.nbytes for t in f.tensors.values()) > STREAM_ABOVE
    flat: dict[str, jax.Array] = {}
    spec, raws, pending = [], {}, 0
    for n, (path, names) in enumerate(by_path.items()):
        decoded = [_raw(f, name) for name in names]
        key = "/".join(path)  # jit needs string keys in pytrees: key the inputs by the joined path
        if stream and path[0] != "layers" and decoded[0][0].nbytes > CONVERT_BYTES * 4:  # an embedding, an output matrix
            flat.update(half_scales(_convert_rows(key, path[-1], *decoded[0], target, layout == "native")))
            f.release_pages()
            trim_heap()
        elif path[0] != "layers":
            spec.append((key, path[-1], ((decoded[0][1], (0,)),)))
            raws[key] = [decoded[0][0]]
        else:
            by_type: dict[GGMLQuantizationType, list[int]] = {}
            for i, (_, t) in enumerate(decoded):
                by_type.setdefault(t, []).append(i)
            spec.append((key, path[-1], tuple((t, tuple(idx)) for t, idx in by_type.items())))
            raws[key] = [np.stack([decoded[i][0] for i in idx]) for idx in by_type.values()]
        pending += sum(r.nbytes for r in raws.get(key, []))
        if spec and ((stream and pending >= CONVERT_BYTES) or n == len(by_path) - 1):
            flat.update(half_scales(_convert(raws, tuple(spec), target, layout == "native")))
            spec, raws, pending = [], {}, 0
            jax.block_until_ready(flat)
            f.release_pages()
            trim_heap()
    return unflatten_paths(flat)


def trim_heap() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it for reuse otherwise:
    a conversion's temporaries would stay resident); nothing where the C library has no `malloc_trim`."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


CONVERT_BYTES = 8 << 20  # leaves converted by one program: at least this many raw bytes (fewer compilations)
STREAM_ABOVE = 256 << 20  # files with more tensor bytes are converted leaf by leaf


def _convert_rows(key: str, kind: str, raw: np.ndarray, ggml_type: GGMLQuantizationType, dtype: Any,
                  native: bool) -> dict[str, jax.Array]:
    """`_convert` of one large 2-D tensor (a 152k-row embedding), `CONVERT_BYTES` of its rows at a
    time, assembled on the host: the conversion's temporaries stay those of one slice."""
    rows = max(1, CONVERT_BYTES // raw[0].nbytes)
    parts: dict[str, list[np.ndarray]] = {}
    for r0 in range(0, raw.shape[0], rows):
        out = _convert({key: [raw[r0: r0 + rows]]}, ((key, kind, ((ggml_type, (0,)),)),), dtype, native)
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v))
        del out
    axis = -1 if kind == "kernel" and not native else 0  # a float kernel is [in, out]: its slices are columns
    out = {}
    for k in list(parts):  # each copy done before the next is assembled: one host copy at a time
        out[k] = jax.block_until_ready(jnp.asarray(np.concatenate(parts.pop(k), axis=axis)))
    return out


def half_scales(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Native leaves' scale and offset as float16 where every one of them is a float16 value
    (checked: each converts back to itself), so nothing changes but their size (GGUF's Q8_0 and
    Q4/Q5 scales are float16; the default model's blocks shrink from 106.4 to 92.1 MiB, the GGUF's bytes)."""
    out = dict(flat)
    for base in [k[: -len("/q")] for k in flat if k.endswith("/q")]:
        keys = [f"{base}/{n}" for n in ("scale", "offset") if f"{base}/{n}" in flat]
        if any(flat[k].dtype != jnp.float32 for k in keys):  # K-quants' int8 multipliers: already small
            continue
        host = [np.asarray(flat[k]) for k in keys]
        halves = [h.astype(np.float16) for h in host]
        if all(np.array_equal(h.astype(np.float32), x) for h, x in zip(halves, host)):
            out.update((k, jax.device_put(h, flat[k].sharding)) for k, h in zip(keys, halves))
    return out


def unflatten_paths(tree: dict[str, jax.Array]) -> Params:
    """Turn '/'-joined keys (`_convert`'s, a kept conversion's) back into nested dicts under
    "params"; the arrays of a native matrix (`{path}/q`, `{path}/scale`, ...) become its `Blocks`."""
    out: Params = {}
    for key, value in tree.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return {"params": typed(out)}


def typed(node: Any) -> Any:
    """Nested dicts with each native matrix as a dict of its arrays (`{"q", "scale", ...}`, as
    files keep them) -> the same with `Blocks`; the inverse of `untyped`."""
    if isinstance(node, dict) and "q" in node and set(node) <= set(ARRAYS):
        return Blocks(**node)
    return {k: typed(v) for k, v in node.items()} if isinstance(node, dict) else node


def untyped(node: Any) -> Any:
    """Every `Blocks` in `node` as the dict of its arrays: plain data for a file."""
    if isinstance(node, Blocks):
        return node.arrays()
    return {k: untyped(v) for k, v in node.items()} if isinstance(node, dict) else node


def flatten_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of `unflatten_paths` (without the "params" level): '/'-joined key -> array,
    a `Blocks`' arrays under its path."""
    if isinstance(tree, Blocks):
        tree = tree.arrays()
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten_paths(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}
