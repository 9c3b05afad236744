"""An independent float64 numpy forward of a GGUF, the oracle for tiny random models.

It shares no code with jaxllama: the file is read with `gguf.GGUFReader`, weights are
dequantized with `gguf.quants`, and the math is written out per head and per pair, straight
from the definitions: RMSNorm; RoPE with theta = p * base^(-2i/d) / freq / scale on adjacent
pairs (llama) or on halves (qwen2, qwen3, gemma3); GQA with head h reading KV head h // (H / K);
SwiGLU silu(gate) * up, or GeGLU gelu_tanh(gate) * up (gemma3); q/k/v biases where the file has
them; QK-norm (qwen3, gemma3); Gemma 3's embedding scale sqrt(D), sandwich norms, query scale
1/sqrt(head_dim), and a sliding window on all but every 6th layer (base 10000 there).
"""

from __future__ import annotations

import gguf
import numpy as np

NEOX = ("qwen2", "qwen3", "gemma3")


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(path, tokens: list[int], keep: dict | None = None, add: dict | None = None) -> np.ndarray:
    """Float64 logits of `tokens`; with `keep`, also fills it with per-layer lists of `l_out`
    `[T, D]`, `ffn_inp`, `attn_weights` `[H, T, T]`, `kqv_out` `[T, H*d]`, and `head(x)`, the final
    norm and output projection as a function (the lens's reference). `add` maps a layer to an
    array added to its output (`l_out`, where llama.cpp adds a control vector)."""
    keep = {} if keep is None else keep
    r = gguf.GGUFReader(path)
    a = _field(r, "general.architecture")
    n_layer = _field(r, f"{a}.block_count")
    n_head = _field(r, f"{a}.attention.head_count")
    n_kv = _field(r, f"{a}.attention.head_count_kv", n_head)
    eps = _field(r, f"{a}.attention.layer_norm_rms_epsilon")
    base = _field(r, f"{a}.rope.freq_base", 10000.0)
    scale = _field(r, f"{a}.rope.scaling.factor", 1.0) if _field(r, f"{a}.rope.scaling.type") == "linear" else 1.0
    window = _field(r, f"{a}.attention.sliding_window", 0) if a == "gemma3" else 0
    W = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape)]
        )
        for t in r.tensors
    }
    emb = W["token_embd.weight"]
    d_model = emb.shape[1]
    hd = _field(r, f"{a}.attention.key_length", d_model // n_head)
    ff = W.get("rope_freqs.weight", np.ones(hd // 2))

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x, layer_base, layer_scale):  # x [T, heads, hd]
        out = x.copy()
        for p in range(x.shape[0]):
            for i in range(hd // 2):
                theta = p * layer_base ** (-2.0 * i / hd) / ff[i] / layer_scale
                c, s = np.cos(theta), np.sin(theta)
                j0, j1 = (i, i + hd // 2) if a in NEOX else (2 * i, 2 * i + 1)
                x0, x1 = x[p, :, j0], x[p, :, j1]
                out[p, :, j0] = x0 * c - x1 * s
                out[p, :, j1] = x0 * s + x1 * c
        return out

    n = len(tokens)
    x = emb[tokens] * (np.sqrt(d_model) if a == "gemma3" else 1.0)
    for layer in range(n_layer):
        g = lambda name, kind="weight": W.get(f"blk.{layer}.{name}.{kind}")  # noqa: E731
        slides = window > 0 and layer % 6 < 5
        layer_base, layer_scale = (10000.0, 1.0) if slides else (base, scale)
        h = norm(x, g("attn_norm"))
        proj = {name: h @ g(name).T + (g(name, "bias") if g(name, "bias") is not None else 0)
                for name in ("attn_q", "attn_k", "attn_v")}
        q, k = proj["attn_q"].reshape(n, n_head, hd), proj["attn_k"].reshape(n, n_kv, hd)
        v = proj["attn_v"].reshape(n, n_kv, hd)
        if g("attn_q_norm") is not None:
            q, k = norm(q, g("attn_q_norm")), norm(k, g("attn_k_norm"))
        q, k = rope(q, layer_base, layer_scale), rope(k, layer_base, layer_scale)
        visible = np.tril(np.ones((n, n), bool))
        if slides:
            visible &= np.subtract.outer(np.arange(n), np.arange(n)) < window
        heads = []
        for head in range(n_head):
            kv = head // (n_head // n_kv)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p = p / p.sum(axis=-1, keepdims=True)
            keep.setdefault("attn_weights", [[] for _ in range(n_layer)])[layer].append(p)
            heads.append(p @ v[:, kv])
        keep.setdefault("kqv_out", []).append(np.concatenate(heads, axis=-1))
        attn = np.concatenate(heads, axis=-1) @ g("attn_output").T
        x = x + (norm(attn, g("post_attention_norm")) if a == "gemma3" else attn)
        keep.setdefault("ffn_inp", []).append(x)
        h = norm(x, g("ffn_norm"))
        gate = h @ g("ffn_gate").T
        act = _gelu_tanh(gate) if a == "gemma3" else gate * 0.5 * (1 + np.tanh(gate / 2))  # silu, overflow-free
        out = (act * (h @ g("ffn_up").T)) @ g("ffn_down").T
        x = x + (norm(out, g("post_ffw_norm")) if a == "gemma3" else out)
        x = x + (add or {}).get(layer, 0.0)
        keep.setdefault("l_out", []).append(x)
    keep["attn_weights"] = [np.stack(w) for w in keep.get("attn_weights", [])]
    keep["head"] = lambda y: norm(y, W["output_norm.weight"]) @ W.get("output.weight", emb).T + W.get("output.bias", 0)
    return keep["head"](x)
