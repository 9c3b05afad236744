"""The model's hyper-parameters, read from GGUF metadata into a frozen dataclass.

The config is hashable, so it is passed to `jax.jit` as a static argument: shapes and
branches (tied output, rope_freqs) are fixed at compile time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import GGUFFormatError, UnsupportedModelError
from .reader import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Attributes:
      n_layer: transformer blocks (`{arch}.block_count`).
      d_model: residual width (`{arch}.embedding_length`).
      d_ff: SwiGLU hidden width (`{arch}.feed_forward_length`).
      n_head: query heads; n_head_kv: key/value heads (GQA when smaller, MHA when equal).
      head_dim: width of one head (`{arch}.attention.key_length`, else d_model / n_head).
      rope_dim: leading dims of each head that RoPE rotates (`{arch}.rope.dimension_count`).
      rope_base: RoPE frequency base (`{arch}.rope.freq_base`, default 10000).
      rope_scale: linear position scaling: positions are divided by this
        (`{arch}.rope.scaling.factor` when `rope.scaling.type == "linear"`, else 1).
      has_rope_freqs: the file has a `rope_freqs` tensor (Llama 3 style), dividing each theta.
      rms_eps: RMSNorm epsilon (`{arch}.attention.layer_norm_rms_epsilon`).
      vocab_size: rows of `token_embd`.
      context_length: training context (`{arch}.context_length`): the longest input accepted.
      tied_output: no `output.weight`; logits use `token_embd` transposed.
    """

    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_scale: float
    has_rope_freqs: bool
    rms_eps: float
    vocab_size: int
    context_length: int
    tied_output: bool

    @property
    def n_group(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "LlamaConfig":
        """Read the config of a supported GGUF; raise a typed error naming what is wrong."""
        arch = _architecture(f)
        get = _MetadataReader(f, arch)
        n_layer, d_model, n_head, n_head_kv, head_dim = _sizes(f, get)
        rope_dim, rope_scale = _rope(f, get, head_dim)
        context_length = get("context_length", int)
        if context_length <= 0:
            raise UnsupportedModelError(f"{f.path}: {arch}.context_length is {context_length}")
        return cls(
            n_layer=n_layer,
            d_model=d_model,
            d_ff=get("feed_forward_length", int),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rope_dim=rope_dim,
            rope_base=float(get("rope.freq_base", (int, float), 10000.0)),
            rope_scale=rope_scale,
            has_rope_freqs="rope_freqs.weight" in f.tensors,
            rms_eps=float(get("attention.layer_norm_rms_epsilon", (int, float), 1e-5)),
            vocab_size=f.tensors["token_embd.weight"].shape[0],
            context_length=context_length,
            tied_output="output.weight" not in f.tensors,
        )


def _architecture(f: GGUFFile) -> str:
    """The file's architecture, if supported and the file has weights."""
    arch = f.metadata.get("general.architecture")
    if arch is None:
        raise GGUFFormatError(f"{f.path}: no general.architecture in metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{f.path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if "token_embd.weight" not in f.tensors:
        what = "a vocab-only GGUF (no tensors)" if not f.tensors else "missing tensor 'token_embd.weight'"
        raise UnsupportedModelError(f"{f.path}: {what}; a model needs weights")
    return arch


class _MetadataReader:
    """`get(key, kind, default)`: the value of `{arch}.{key}`, type-checked, with one-line errors."""

    def __init__(self, f: GGUFFile, arch: str):
        self.f, self.arch = f, arch

    def __call__(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        full = f"{self.arch}.{key}"
        v = self.f.metadata.get(full, default)
        if v is None:
            raise GGUFFormatError(f"{self.f.path}: missing metadata {full}")
        if isinstance(v, bool) or not isinstance(v, kind):
            raise UnsupportedModelError(f"{self.f.path}: metadata {full} = {_short(v)} is not a single {kind}")
        return v


def _sizes(f: GGUFFile, get: _MetadataReader) -> tuple[int, int, int, int, int]:
    """Layers, width, query heads, KV heads and head size, checked for consistency."""
    n_layer = get("block_count", int)
    d_model = get("embedding_length", int)
    n_head = get("attention.head_count", int)
    n_head_kv = get("attention.head_count_kv", int, n_head)
    if min(n_layer, d_model, n_head, n_head_kv) <= 0 or n_head % n_head_kv:
        raise UnsupportedModelError(
            f"{f.path}: invalid sizes: {n_layer} layers, width {d_model}, {n_head} heads, {n_head_kv} KV heads"
        )
    if n_layer * 9 > len(f.tensors):
        raise UnsupportedModelError(
            f"{f.path}: {get.arch}.block_count is {n_layer} but the file has only {len(f.tensors)} tensors"
        )
    head_dim = get("attention.key_length", int, d_model // n_head)
    if head_dim <= 0:
        raise UnsupportedModelError(f"{f.path}: head size {head_dim} from {n_head} heads of width {d_model}")
    if get("attention.value_length", int, head_dim) != head_dim:
        raise UnsupportedModelError(f"{f.path}: key and value head sizes differ")
    return n_layer, d_model, n_head, n_head_kv, head_dim


def _rope(f: GGUFFile, get: _MetadataReader, head_dim: int) -> tuple[int, float]:
    """Rotated dims per head and the linear position scale (1 without scaling)."""
    rope_dim = get("rope.dimension_count", int, head_dim)
    if not 0 < rope_dim <= head_dim or rope_dim % 2:
        raise UnsupportedModelError(f"{f.path}: rope.dimension_count {rope_dim} invalid for head size {head_dim}")
    scaling = f.metadata.get(f"{get.arch}.rope.scaling.type", "none")
    if scaling == "none":
        return rope_dim, 1.0
    if scaling != "linear":
        raise UnsupportedModelError(f"{f.path}: unsupported rope scaling type {scaling!r} (supported: none, linear)")
    rope_scale = float(get("rope.scaling.factor", (int, float)))
    if not rope_scale > 0:
        raise UnsupportedModelError(f"{f.path}: rope.scaling.factor {rope_scale} must be > 0")
    return rope_dim, rope_scale


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."
