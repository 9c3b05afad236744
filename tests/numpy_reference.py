"""An independent float64 numpy forward of a Llama GGUF, the oracle for tiny random models.

It shares no code with jaxllama: the file is read with `gguf.GGUFReader`, weights are
dequantized with `gguf.quants`, and the math is written out per head and per pair, straight
from the definitions (RMSNorm, adjacent-pair RoPE with theta = p * base^(-2i/d) / freq / scale,
GQA with head h reading KV head h // (H / K), SwiGLU silu(gate) * up).
"""

from __future__ import annotations

import gguf
import numpy as np


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def reference_logits(path, tokens: list[int]) -> np.ndarray:
    r = gguf.GGUFReader(path)
    a = _field(r, "general.architecture")
    n_layer = _field(r, f"{a}.block_count")
    n_head = _field(r, f"{a}.attention.head_count")
    n_kv = _field(r, f"{a}.attention.head_count_kv", n_head)
    eps = _field(r, f"{a}.attention.layer_norm_rms_epsilon")
    base = _field(r, f"{a}.rope.freq_base", 10000.0)
    scale = _field(r, f"{a}.rope.scaling.factor", 1.0) if _field(r, f"{a}.rope.scaling.type") == "linear" else 1.0
    W = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape)]
        )
        for t in r.tensors
    }
    emb = W["token_embd.weight"]
    d_model = emb.shape[1]
    hd = d_model // n_head
    ff = W.get("rope_freqs.weight", np.ones(hd // 2))

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x):  # x [T, heads, hd]
        out = x.copy()
        for p in range(x.shape[0]):
            for i in range(hd // 2):
                theta = p * base ** (-2.0 * i / hd) / ff[i] / scale
                c, s = np.cos(theta), np.sin(theta)
                x0, x1 = x[p, :, 2 * i], x[p, :, 2 * i + 1]
                out[p, :, 2 * i] = x0 * c - x1 * s
                out[p, :, 2 * i + 1] = x0 * s + x1 * c
        return out

    n = len(tokens)
    x = emb[tokens]
    for layer in range(n_layer):
        g = lambda name: W[f"blk.{layer}.{name}.weight"]  # noqa: E731
        h = norm(x, g("attn_norm"))
        q = rope((h @ g("attn_q").T).reshape(n, n_head, hd))
        k = rope((h @ g("attn_k").T).reshape(n, n_kv, hd))
        v = (h @ g("attn_v").T).reshape(n, n_kv, hd)
        heads = []
        for head in range(n_head):
            kv = head // (n_head // n_kv)
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            heads.append((p / p.sum(axis=-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ g("attn_output").T
        h = norm(x, g("ffn_norm"))
        gate = h @ g("ffn_gate").T
        silu = gate * 0.5 * (1 + np.tanh(gate / 2))  # gate * sigmoid(gate), overflow-free
        x = x + (silu * (h @ g("ffn_up").T)) @ g("ffn_down").T
    x = norm(x, W["output_norm.weight"])
    return x @ W.get("output.weight", emb).T
