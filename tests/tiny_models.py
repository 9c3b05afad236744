"""Small random Llama GGUFs written with `gguf.GGUFWriter`, for tests.

Weights are random; quantized types come from `gguf.quants.quantize` where it can quantize
(F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and from random blocks with sane scales for the
K-quants (which gguf cannot quantize). A trivial one-character-per-id BPE vocabulary lets llama.cpp load them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType

# byte offsets of the float16 scale fields inside one block, and the largest factor the
# packed sub-scales and quants multiply that scale by, per K-quant
_K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
QUANTIZABLE = {T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
_K_RANGE = {T.Q2_K: 45, T.Q3_K: 128, T.Q4_K: 945, T.Q5_K: 1953, T.Q6_K: 4064}


@dataclass(frozen=True)
class TinySpec:
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    d_ff: int = 128
    vocab: int = 96
    context: int = 256
    rope_base: float = 10000.0
    rope_scale: float | None = None  # linear scaling factor
    rope_freqs: bool = False
    tied: bool = True
    matrix_type: T = T.F32
    # per-layer overrides of the matrix type, e.g. {("ffn_down", 1): T.Q6_K}
    overrides: dict = field(default_factory=dict, hash=False)
    embd_type: T = T.F32
    architecture: str = "llama"  # llama, qwen2 (q/k/v biases), qwen3 (QK-norm), gemma3 (all of Gemma 3)
    drop: tuple[str, ...] = ()  # tensor names to leave out (for error tests)
    head_dim: int | None = None  # attention.key_length (default d_model / n_head)
    sliding_window: int = 0  # gemma3: attention.sliding_window (pattern: every 6th layer global)
    qkv_bias: bool | None = None  # default: True for qwen2
    add_bos: bool | None = None  # tokenizer.ggml.add_bos_token (None: not written)


def random_blocks(qtype: T, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a K-quant tensor with float16 scales chosen so |weights| < ~0.2."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_values // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        scale = (rng.uniform(0.5, 1.0, size=raw.shape[0]) * 0.2 / _K_RANGE[qtype]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def encode(values: np.ndarray, qtype: T, rng: np.random.Generator) -> tuple[np.ndarray, T | None]:
    """Array to write and its raw dtype (None for plain float32)."""
    if qtype == T.F32:
        return values.astype(np.float32), None
    if qtype == T.F16:
        return values.astype(np.float16), None
    if qtype in _K_SCALES:
        rows = values.shape[0]
        return random_blocks(qtype, values.size, rng).reshape(rows, -1), qtype
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(values.astype(np.float32), qtype), qtype
    block, size = gguf.GGML_QUANT_SIZES[qtype]  # anything else: random bytes
    return rng.integers(0, 256, size=(values.size // block, size), dtype=np.uint8).reshape(values.shape[0], -1), qtype


def write_tiny_gguf(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    s = spec
    hd = s.head_dim or s.d_model // s.n_head
    qk_norm = s.architecture in ("qwen3", "gemma3")
    bias = s.architecture == "qwen2" if s.qkv_bias is None else s.qkv_bias
    w = gguf.GGUFWriter(str(path), s.architecture)
    a = s.architecture
    w.add_string("general.name", "tiny-random")
    w.add_uint32(f"{a}.block_count", s.n_layer)
    w.add_uint32(f"{a}.context_length", s.context)
    w.add_uint32(f"{a}.embedding_length", s.d_model)
    w.add_uint32(f"{a}.feed_forward_length", s.d_ff)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    w.add_float32(f"{a}.rope.freq_base", s.rope_base)
    w.add_uint32(f"{a}.rope.dimension_count", hd)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    if s.head_dim:
        w.add_uint32(f"{a}.attention.key_length", hd)
        w.add_uint32(f"{a}.attention.value_length", hd)
    if s.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", s.sliding_window)
    if s.rope_scale is not None:
        w.add_string(f"{a}.rope.scaling.type", "linear")
        w.add_float32(f"{a}.rope.scaling.factor", s.rope_scale)
    # A trivial byte-level BPE vocabulary (one printable character per id) so llama.cpp loads it.
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", [chr(33 + i) for i in range(s.vocab)])
    w.add_array("tokenizer.ggml.token_type", [1] * s.vocab)
    w.add_array("tokenizer.ggml.merges", ["! \""])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    if s.add_bos is not None:
        w.add_bool("tokenizer.ggml.add_bos_token", s.add_bos)

    def add(name: str, values: np.ndarray, qtype: T) -> None:
        data, raw_dtype = encode(values, qtype, rng)
        if name in s.drop:
            return
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 1 / np.sqrt(cols), size=(rows, cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return rng.uniform(0.5, 1.5, size=n).astype(np.float32)

    add("token_embd.weight", rng.normal(0, 1, size=(s.vocab, s.d_model)).astype(np.float32), s.embd_type)
    if s.rope_freqs:
        add("rope_freqs.weight", rng.uniform(1.0, 8.0, size=hd // 2).astype(np.float32), T.F32)
    shapes = {
        "attn_q": (s.n_head * hd, s.d_model),
        "attn_k": (s.n_head_kv * hd, s.d_model),
        "attn_v": (s.n_head_kv * hd, s.d_model),
        "attn_output": (s.d_model, s.n_head * hd),
        "ffn_gate": (s.d_ff, s.d_model),
        "ffn_up": (s.d_ff, s.d_model),
        "ffn_down": (s.d_model, s.d_ff),
    }
    for i in range(s.n_layer):
        add(f"blk.{i}.attn_norm.weight", norm(s.d_model), T.F32)
        add(f"blk.{i}.ffn_norm.weight", norm(s.d_model), T.F32)
        for short, shape in shapes.items():
            add(f"blk.{i}.{short}.weight", mat(*shape), s.overrides.get((short, i), s.matrix_type))
        if bias:
            for short in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{i}.{short}.bias", rng.normal(0, 0.5, size=shapes[short][0]).astype(np.float32), T.F32)
        if qk_norm:
            add(f"blk.{i}.attn_q_norm.weight", norm(hd), T.F32)
            add(f"blk.{i}.attn_k_norm.weight", norm(hd), T.F32)
        if s.architecture == "gemma3":
            add(f"blk.{i}.post_attention_norm.weight", norm(s.d_model), T.F32)
            add(f"blk.{i}.post_ffw_norm.weight", norm(s.d_model), T.F32)
    add("output_norm.weight", norm(s.d_model), T.F32)
    if not s.tied:
        add("output.weight", mat(s.vocab, s.d_model), s.matrix_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
