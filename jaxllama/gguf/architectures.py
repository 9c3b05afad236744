"""What varies between the supported architectures, declared once per architecture.

The forward is one pure scanned function for all of them; it reads only the flags that
`LlamaConfig` carries, and those come from the `Architecture` below plus the file's metadata.
Every entry follows llama.cpp's graph for that architecture (`src/models/<name>.cpp`, and
`llama-model.cpp` for RoPE types and defaults), including the names llama.cpp gives its
intermediate tensors, which are our probe names, so `compare` lines up one to one.

Adding an architecture: add an `Architecture` here (read llama.cpp's graph for it), and, if it
needs an operation the forward does not have yet, one flag in `LlamaConfig` and the few lines
in `model.block` that act on it. Then add a tiny random GGUF of it to the tests
(`tests/tiny_models.py`) and check it against llama.cpp and the numpy reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

#: Probes outside the layers, in execution order, shared by every architecture.
GLOBAL_BEFORE = ("inp_embd",)
GLOBAL_AFTER = ("result_norm", "result_output")


@dataclass(frozen=True)
class Architecture:
    """One architecture's choices (see the module docstring).

    rope: "norm" rotates adjacent pairs (x[2i], x[2i+1]); "neox" rotates halves (x[i], x[i+d/2]).
    qk_norm: each query and key head is RMS-normalised (attn_q_norm, attn_k_norm) before RoPE.
    post_norms: "sandwich" norms after the attention and the feed-forward outputs.
    activation: "silu" (SwiGLU: silu(gate) * up) or "gelu_tanh" (GeGLU: gelu(gate) * up).
    embed_scale: embeddings are multiplied by sqrt(d_model).
    swa_pattern: with a sliding window in the metadata, every swa_pattern-th layer is global and
      the others slide (llama.cpp's default when the file gives no pattern); 0: no window.
    rope_base_swa: RoPE base of sliding-window layers when the file does not give one.
    query_scale: (d_model, n_head, head_dim, n_layer) -> the factor applied to q.k.
    biases: optional bias tensors llama.cpp loads for this architecture (short names).
    layer_probes: llama.cpp's names of the per-layer tensors, in execution order.
    global_probes: names outside the layers, in execution order.
    """

    name: str
    rope: str = "norm"
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    swa_pattern: int = 0
    rope_base_swa: float = 10000.0
    query_scale: Callable[[int, int, int, int], float] = lambda d_model, n_head, head_dim, n_layer: 1 / math.sqrt(head_dim)
    biases: frozenset[str] = frozenset({"attn_q", "attn_k", "attn_v"})
    layer_probes: tuple[str, ...] = ()
    global_probes: tuple[str, ...] = GLOBAL_BEFORE + GLOBAL_AFTER


def _gemma3_query_scale(d_model: int, n_head: int, head_dim: int, n_layer: int) -> float:
    """gemma_pytorch's query_pre_attn_scalar: d_model / n_head for the 27B (62 layers), else head_dim."""
    return 1 / math.sqrt(d_model // n_head) if n_layer == 62 else 1 / math.sqrt(head_dim)


_SWIGLU_FFN = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "l_out")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "llama",
            biases=frozenset({"attn_q", "attn_k", "attn_v", "attn_output"}),
            layer_probes=("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", *_SWIGLU_FFN),
        ),
        Architecture(
            "qwen2",
            rope="neox",
            biases=frozenset({"attn_q", "attn_k", "attn_v", "output"}),
            layer_probes=("attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "ffn_inp", *_SWIGLU_FFN),
        ),
        Architecture(
            "qwen3",
            rope="neox",
            qk_norm=True,
            layer_probes=("attn_norm", "Qcur_normed", "Kcur_normed", "Qcur", "Kcur", "Vcur", "kqv_out", "ffn_inp",
                          *_SWIGLU_FFN),
        ),
        Architecture(
            "gemma3",
            rope="neox",
            qk_norm=True,
            post_norms=True,
            activation="gelu_tanh",
            embed_scale=True,
            swa_pattern=6,
            query_scale=_gemma3_query_scale,
            layer_probes=("attn_norm", "Qcur_normed", "Kcur_normed", "Qcur", "Kcur", "Vcur", "kqv_out",
                          "attn_post_norm", "sa_out", "ffn_norm", "ffn_gate", "ffn_up", "ffn_geglu", "ffn_out",
                          "ffn_post_norm", "l_out"),
            global_probes=("inp_embd", "inp_scaled", *GLOBAL_AFTER),
        ),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
