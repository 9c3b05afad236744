"""The model's hyper-parameters, read from GGUF metadata into a frozen dataclass.

The config is hashable, so it is passed to `jax.jit` as a static argument: shapes and
branches (tied output, rope_freqs, the architecture's flags) are fixed at compile time. What
differs between architectures is declared in `architectures.py`; the config carries the
resulting flags, so the forward never asks for an architecture by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

import math

from ..errors import GGUFFormatError, UnsupportedModelError
from .architectures import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture
from .reader import GGUFFile


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
      arch: `general.architecture` (its choices are in `architectures.ARCHITECTURES`).
      rope_neox: RoPE rotates halves (x[i], x[i + rope_dim/2]) instead of adjacent pairs.
      qk_norm: queries and keys are RMS-normalised per head (attn_q_norm, attn_k_norm).
      qkv_bias / out_bias / output_bias: bias vectors on q, k, v / attn_output / the logits.
      post_norms: RMSNorm after the attention and feed-forward outputs (post_attention_norm,
        post_ffw_norm), before each residual add.
      activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, llama.cpp's CPU GELU).
      embed_scale: factor applied to the embeddings (sqrt(d_model) for Gemma, else 1).
      query_scale: factor applied to q.k before the softmax.
      sliding_window: keys at most this many positions back are visible in sliding layers (0: none).
      swa_layers: per layer, whether it slides (and uses rope_base_swa / rope_scale_swa).
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
    arch: str = "llama"
    rope_neox: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    output_bias: bool = False
    post_norms: bool = False
    activation: str = "silu"
    embed_scale: float = 1.0
    query_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_base_swa: float = 10000.0
    rope_scale_swa: float = 1.0

    def __post_init__(self) -> None:
        if self.query_scale == 0.0:
            object.__setattr__(self, "query_scale", 1 / math.sqrt(self.head_dim))
        if len(self.swa_layers) != self.n_layer:
            if any(self.swa_layers):
                raise ValueError(f"swa_layers has {len(self.swa_layers)} flags for {self.n_layer} layers")
            object.__setattr__(self, "swa_layers", (False,) * self.n_layer)  # e.g. replace(c, n_layer=...)

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def layer_probes(self) -> tuple[str, ...]:
        """llama.cpp's names of this architecture's per-layer tensors, in execution order."""
        return self.architecture.layer_probes

    @property
    def global_probes(self) -> tuple[str, ...]:
        return self.architecture.global_probes

    @property
    def probe_order(self) -> tuple[str, ...]:
        """Every probe in execution order (global ones before and after the layers)."""
        g = self.global_probes
        before = tuple(p for p in g if p not in ("result_norm", "result_output"))
        return (*before, *self.layer_probes, *(p for p in g if p not in before))

    @property
    def n_group(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for JSON and msgpack."""
        d = dataclasses.asdict(self)
        d["swa_layers"] = list(d["swa_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        if "swa_layers" in values:  # lists after a JSON/msgpack round trip
            values["swa_layers"] = tuple(bool(v) for v in values["swa_layers"])
        return cls(**values)

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
        a = ARCHITECTURES[arch]
        window, swa_layers = _sliding_window(f, get, a, n_layer)
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
            arch=arch,
            rope_neox=a.rope == "neox",
            qk_norm=a.qk_norm,
            qkv_bias="blk.0.attn_q.bias" in f.tensors,
            out_bias="blk.0.attn_output.bias" in f.tensors,
            output_bias="output.bias" in f.tensors,
            post_norms=a.post_norms,
            activation=a.activation,
            embed_scale=float(np.float32(math.sqrt(d_model))) if a.embed_scale else 1.0,
            query_scale=float(get("attention.scale", (int, float), 0.0)) or a.query_scale(d_model, n_head, head_dim, n_layer),
            sliding_window=window,
            swa_layers=swa_layers,
            rope_base_swa=float(get("rope.freq_base_swa", (int, float), a.rope_base_swa)),
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


def _sliding_window(f: GGUFFile, get: _MetadataReader, a: Architecture, n_layer: int) -> tuple[int, tuple[bool, ...]]:
    """The window and which layers slide: `attention.sliding_window_pattern` (a period, or one
    flag per layer) or the architecture's default period; every period-th layer is global."""
    window = get("attention.sliding_window", int, 0) if a.swa_pattern else 0
    if window <= 0:
        return 0, (False,) * n_layer
    pattern = f.metadata.get(f"{a.name}.attention.sliding_window_pattern", a.swa_pattern)
    if isinstance(pattern, (list, np.ndarray)):
        flags = tuple(bool(v) for v in list(pattern)[:n_layer])
        if len(flags) != n_layer:
            raise UnsupportedModelError(f"{f.path}: sliding_window_pattern has {len(flags)} flags for {n_layer} layers")
        return window, flags
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise UnsupportedModelError(f"{f.path}: invalid {a.name}.attention.sliding_window_pattern {_short(pattern)}")
    return window, tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))


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
