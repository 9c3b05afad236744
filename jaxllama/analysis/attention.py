"""Attention patterns (llama.cpp's `kq_soft_max`) and per-head scores.

The weights are recomputed from the captured `Qcur` and `Kcur` of the requested layers only (the
forward itself never builds a `[H, T, S]` array: it attends blockwise): `softmax(q·k * scale)`
over the causally visible keys, within the sliding window on Gemma's sliding layers, exactly the
keys the model's attention sees. Memory: `[layers requested, H, T, T]` float32, and one layer at
a time for the scores.

Scores per head, for every layer (`head_scores`):
- previous token: mean attention from position t to t-1 (t >= 1);
- sink: mean attention to the first position (t >= 1);
- induction (Olsson et al. 2022): on a seeded random token sequence repeated twice, mean
  attention from each token of the second copy to the token after its first occurrence;
- direct logit: each head's output through the output projection and the unembedding, onto a
  target token's logit at the last position, with the final RMSNorm (and Gemma's post-attention
  norm) frozen at their values in the run, as TransformerLens's direct logit attribution does:
  over all heads, the MLPs, the embedding and the biases these contributions sum to the logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import InvalidInputError
from ..gguf.blocks import Blocks
from ..gguf.config import LlamaConfig
from ..model import NO_WINDOW, forward_capture, output_kernel
from ..tracing.probes import ProbeSpec, check_layers


def weights_from_qk(q: jax.Array, k: jax.Array, c: LlamaConfig, slides: jax.Array) -> jax.Array:
    """Softmax attention weights `[H, T, S]` of one layer from q `[T, H, d]`, k `[S, K, d]`
    (query t sits at slot t; keys at slots 0..S-1), float32."""
    t, s = q.shape[0], k.shape[0]
    kq = jnp.repeat(k, c.n_group, axis=1)  # query head h reads KV head h // n_group
    scores = jnp.einsum("thd,shd->hts", q, kq, precision=lax.Precision.HIGHEST) * np.float32(c.query_scale)
    window = jnp.where(slides, c.sliding_window, NO_WINDOW)
    tq, sk = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    seen = (sk <= tq) & (tq - sk < window)
    return jax.nn.softmax(jnp.where(seen[None], scores, -jnp.inf), axis=-1)


@partial(jax.jit, static_argnames=("config", "layers"))
def attention_weights(params: Any, tokens: jax.Array, config: LlamaConfig, layers: tuple[int, ...]) -> jax.Array:
    """`kq_soft_max` of `layers` for one row of tokens `[T]`: `[len(layers), H, T, T]`."""
    spec = ProbeSpec(capture=("Qcur", "Kcur"), capture_layers=layers)
    _, caps = forward_capture(params, tokens[None], config, probes=spec)
    slides = jnp.asarray([config.swa_layers[i] for i in layers], bool)
    return jax.vmap(lambda q, k, sl: weights_from_qk(q, k, config, sl))(caps["Qcur"][:, 0], caps["Kcur"][:, 0], slides)


def attention_patterns(model: Any, tokens: Sequence[int], layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """`{layer: [H, T, T]}` attention weights of `tokens` for `layers` (default: all)."""
    ids = model.check_tokens(tokens)
    chosen = check_layers(range(model.config.n_layer) if layers is None else layers, model.config)
    w = np.asarray(attention_weights(model.params, jnp.asarray(ids), model.config, chosen))
    return dict(zip(chosen, w))


def matrix_in_out(w: Blocks | jax.Array) -> jax.Array:
    """A layer-stacked matrix as float32 `[L, in, out]` (GGUF blocks are `[L, out, in]`)."""
    return jnp.swapaxes(w.values(), -1, -2) if isinstance(w, Blocks) else w.astype(jnp.float32)


def unembedding(p: dict, c: LlamaConfig, token: jax.Array) -> jax.Array:
    """The output matrix's row for `token`: `[D]` float32 (the embedding's, when tied)."""
    w = output_kernel(p, c)
    if isinstance(w, Blocks):  # [V, D]: dequantize that row alone
        return w.take(token[None]).values()[0]
    return w[:, token].astype(jnp.float32)


def _rms(x: jax.Array, eps: float) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=-1) + eps)


@partial(jax.jit, static_argnames=("config",))
def _prompt_scores(params: Any, tokens: jax.Array, target: jax.Array, config: LlamaConfig) -> dict[str, jax.Array]:
    c, p = config, params["params"]
    capture = ("Qcur", "Kcur", "kqv_out", "l_out")
    _, caps = forward_capture(params, tokens[None], c, probes=ProbeSpec(capture=capture))
    t = tokens.shape[0]
    w_o = matrix_in_out(p["layers"]["attn_output"]["kernel"]).reshape(c.n_layer, c.n_head, c.head_dim, c.d_model)
    final = caps["l_out"][-1, 0, -1]  # the last position's residual stream after the last layer
    u = unembedding(p, c, target) * p["output_norm"]["scale"] / _rms(final, c.rms_eps)  # frozen final norm

    def layer(xs):
        q, k, a, wo, slides, post = xs
        w = weights_from_qk(q, k, c, slides)  # [H, T, T]
        rows = jnp.arange(1, t)
        prev = jnp.mean(w[:, rows, rows - 1], axis=-1) if t > 1 else jnp.zeros(c.n_head)
        sink = jnp.mean(w[:, rows, 0], axis=-1) if t > 1 else jnp.zeros(c.n_head)
        heads = jnp.einsum("hd,hdD->hD", a[-1].reshape(c.n_head, c.head_dim), wo,
                           precision=lax.Precision.HIGHEST)  # each head's output at the last position
        if c.post_norms:  # Gemma: the post-attention norm, frozen at the whole output's rms
            heads = heads * post / _rms(heads.sum(0), c.rms_eps)
        return prev, sink, heads @ u

    post = p["layers"]["post_attention_norm"]["scale"] if c.post_norms else jnp.ones((c.n_layer, c.d_model))
    prev, sink, direct = lax.map(layer, (caps["Qcur"][:, 0], caps["Kcur"][:, 0], caps["kqv_out"][:, 0], w_o,
                                         jnp.asarray(c.swa_layers, bool), post))
    return {"previous_token": prev, "sink": sink, "direct_logit": direct}


@partial(jax.jit, static_argnames=("config", "offset", "n"))
def _induction_scores(params: Any, tokens: jax.Array, config: LlamaConfig, offset: int, n: int) -> jax.Array:
    c = config
    _, caps = forward_capture(params, tokens[None], c, probes=ProbeSpec(capture=("Qcur", "Kcur")))
    i = jnp.arange(n - 1)
    rows, cols = offset + n + i, offset + i + 1  # second copy's token -> the token after its first occurrence

    def layer(xs):
        q, k, slides = xs
        return jnp.mean(weights_from_qk(q, k, c, slides)[:, rows, cols], axis=-1)

    return lax.map(layer, (caps["Qcur"][:, 0], caps["Kcur"][:, 0], jnp.asarray(c.swa_layers, bool)))


@dataclass(frozen=True)
class HeadScores:
    """`[layers, heads]` scores (see the module docstring) and what they were computed on."""

    previous_token: np.ndarray
    sink: np.ndarray
    induction: np.ndarray
    direct_logit: np.ndarray
    target_id: int
    induction_tokens: list[int]

    def to_json(self) -> dict[str, Any]:
        r = lambda a: np.round(a.astype(np.float64), 7).tolist()  # noqa: E731
        return {"previous_token": r(self.previous_token), "sink": r(self.sink), "induction": r(self.induction),
                "direct_logit": r(self.direct_logit), "target_id": self.target_id,
                "induction_tokens": self.induction_tokens}


def induction_tokens(model: Any, n: int, seed: int) -> tuple[list[int], int]:
    """A seeded random sequence of `n` ordinary tokens repeated twice (after BOS when the model
    adds one), and the offset of its first copy."""
    tok, c = model.tokenizer, model.config
    rng = np.random.default_rng(seed)
    pool = [i for i in range(c.vocab_size) if not tok.is_control(i)]
    r = [int(x) for x in rng.choice(pool, size=n, replace=False)]
    bos = tok.encode("", add_special=True)
    return bos + r + r, len(bos)


def head_scores(model: Any, tokens: Sequence[int], target: int | None = None, induction_length: int = 32,
                seed: int = 0) -> HeadScores:
    """Every head's scores on `tokens` (direct logit attribution onto `target`, by default the
    model's top prediction after `tokens`) and induction on a seeded repeated random sequence."""
    c = model.config
    ids = model.check_tokens(tokens)
    if target is None:
        target = int(np.argmax(model.logits(ids)[-1]))
    if not 0 <= target < c.vocab_size:
        raise InvalidInputError(f"target: token id {target} is outside the vocabulary 0..{c.vocab_size - 1}")
    if not 2 <= induction_length <= min(c.vocab_size // 2, c.context_length // 2 - 1):
        raise InvalidInputError(f"induction length: must be 2..{min(c.vocab_size // 2, c.context_length // 2 - 1)}")
    s = _prompt_scores(model.params, jnp.asarray(ids), jnp.int32(target), c)
    rep, offset = induction_tokens(model, induction_length, seed)
    ind = _induction_scores(model.params, jnp.asarray(rep), c, offset, induction_length)
    return HeadScores(np.asarray(s["previous_token"]), np.asarray(s["sink"]), np.asarray(ind),
                      np.asarray(s["direct_logit"]), target, rep)


def plot_attention(patterns: dict[int, np.ndarray], scores: HeadScores | None, labels: Sequence[str], path: str) -> None:
    """Each requested layer's heads as heatmaps, and the four score grids (layer x head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(patterns)
    heads = next(iter(patterns.values())).shape[0] if patterns else 0
    rows = len(layers) + (1 if scores is not None else 0)
    cols = max(heads, 4)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[i, h]
            ax.imshow(patterns[layer][h], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{layer} H{h}", fontsize=8)
    if scores is not None:
        grids = {"previous token": scores.previous_token, "induction": scores.induction, "sink": scores.sink,
                 f"direct logit ({labels[0] if labels else scores.target_id})": scores.direct_logit}
        for j, (name, g) in enumerate(grids.items()):
            ax = axes[-1, j]
            ax.axis("on")
            span = float(np.abs(g).max()) or 1.0
            im = ax.imshow(g, aspect="auto", origin="lower", cmap="RdBu_r" if "direct" in name else "viridis",
                           **({"vmin": -span, "vmax": span} if "direct" in name else {}))
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("head", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
