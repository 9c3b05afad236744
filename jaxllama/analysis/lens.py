"""The logit lens: every layer's residual stream read through the model's final norm and output.

For each read-out (a layer's `l_out`, optionally its `ffn_inp`) and position: the top-k tokens
with their probabilities, the entropy, the KL divergence from the final distribution
(KL(final ‖ lens), as tuned-lens reports it) and the probability and rank of a target token.

Memory: the `[read-outs, T, vocab]` logits are never built. Positions go through the head
`chunk` at a time (all read-outs of those positions in one product, `lens_chunk`), so one
chunk's logits take at most `LENS_BYTES` (at least one position), and a compiled lens needs about
`LENS_TEMPS` such arrays plus the head's own float32 slice of the output matrix
(`model.DEQUANT_BYTES`), whatever the length, and besides that only what grows with the length
alone (the read-outs rearranged, the results): `lens_bound`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import InvalidInputError
from ..gguf.config import LlamaConfig
from ..model import DEQUANT_BYTES, forward_capture_jit, head
from ..tracing.probes import ProbeSpec

LENS_BYTES = 32 << 20  # one chunk's float32 logits (read-outs x positions x vocabulary)
LENS_TEMPS = 6  # arrays of a chunk's size alive at once: logits, log-probs, probs, KL terms, two of XLA's


def lens_chunk(readouts: int, vocab: int) -> int:
    """Positions per chunk: as many as keep `readouts * chunk * vocab` float32 under `LENS_BYTES`."""
    return max(1, LENS_BYTES // (4 * readouts * vocab))


def lens_bound(readouts: int, vocab: int, d_model: int, length: int, k: int = 5) -> int:
    """Bytes a compiled lens may need beyond its inputs and outputs: `LENS_TEMPS` chunks of
    logits and the head's float32 slice of the output matrix (nothing that grows with
    `length * vocab`), plus two copies of what grows with the length alone: the read-outs
    rearranged into chunks and the per-position results."""
    chunk = lens_chunk(readouts, vocab)
    per_position = 4 * readouts * (d_model + 2 * k + 4)
    return LENS_TEMPS * 4 * readouts * chunk * vocab + DEQUANT_BYTES + 4 * vocab * d_model + 2 * per_position * length


@partial(jax.jit, static_argnames=("config", "k", "chunk"))
def lens_stats(params: Any, resid: jax.Array, targets: jax.Array, config: LlamaConfig, k: int,
               chunk: int) -> dict[str, jax.Array]:
    """Lens statistics of read-outs `resid [R, T, D]` (the last must be the final layer's
    `l_out`: its distribution is the model's own) for target ids `targets [T]` (-1: none).

    Returns `[R, T]` arrays `entropy`, `kl_to_final`, `target_prob`, `target_rank` (0 = top;
    NaN and -1 where there is no target) and `[R, T, k]` `top_ids`, `top_probs`.
    """
    p = params["params"]
    r, t, d = resid.shape
    pad = -t % chunk
    x = jnp.pad(resid, ((0, 0), (0, pad), (0, 0))).reshape(r, -1, chunk, d).transpose(1, 0, 2, 3)
    tg = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, chunk)

    def one(xs: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        xc, tc = xs  # [R, C, D], [C]
        logits = head(p, xc.reshape(1, r * chunk, d), config, {}).reshape(r, chunk, -1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        probs = jnp.exp(logp)
        final = logp[-1]
        top_logp, top_ids = lax.top_k(logp, k)
        safe = jnp.maximum(tc, 0)
        t_logit = jnp.take_along_axis(logits, jnp.broadcast_to(safe[None, :, None], (r, chunk, 1)), -1)
        t_logp = jnp.take_along_axis(logp, jnp.broadcast_to(safe[None, :, None], (r, chunk, 1)), -1)[..., 0]
        has = tc[None, :] >= 0
        return {
            "entropy": -jnp.sum(probs * logp, axis=-1),
            "kl_to_final": jnp.sum(jnp.exp(final)[None] * (final[None] - logp), axis=-1),
            "target_prob": jnp.where(has, jnp.exp(t_logp), jnp.nan),
            "target_rank": jnp.where(has, jnp.sum(logits > t_logit, axis=-1), -1),
            "top_ids": top_ids,
            "top_probs": jnp.exp(top_logp),
        }

    out = lax.map(one, (x, tg))  # [n, R, C, ...]
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(r, -1, *a.shape[3:])[:, :t], out)


@dataclass(frozen=True)
class Lens:
    """A logit lens over one text: read-out `i` is `probes[i]` of layer `layers[i]`; arrays are
    `[read-outs, T]` (`top_ids`, `top_probs`: `[read-outs, T, k]`)."""

    layers: list[int]
    probes: list[str]
    tokens: list[int]
    target_ids: list[int]
    entropy: np.ndarray
    kl_to_final: np.ndarray
    target_prob: np.ndarray
    target_rank: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The `--json` contract: `layers`, `probes`, `tokens`, `target_id` (per position), and per
        read-out x position `target_prob`, `target_rank`, `top_ids`, `top_probs`, `entropy`,
        `kl_to_final` (no target: null)."""
        prob = [[None if np.isnan(v) else float(v) for v in row] for row in self.target_prob]
        rank = [[None if v < 0 else int(v) for v in row] for row in self.target_rank]
        return {"layers": self.layers, "probes": self.probes, "tokens": self.tokens,
                "target_id": [None if i < 0 else i for i in self.target_ids], "target_prob": prob,
                "target_rank": rank, "top_ids": self.top_ids.tolist(),
                "top_probs": self.top_probs.round(7).tolist(), "entropy": self.entropy.round(7).tolist(),
                "kl_to_final": self.kl_to_final.round(9).tolist()}


def logit_lens(model: Any, tokens: Sequence[int], target: int | None = None, k: int = 5,
               probes: Sequence[str] = ("l_out",), translators: Any = None) -> Lens:
    """The logit lens of `tokens` at every layer's `probes` (residual-stream probes: `l_out`,
    `ffn_inp`, Gemma's `sa_out`). The target at each position is `target`, or else the text's
    next token (none at the last position). With `translators` (`tuned.Translators`, `l_out`
    only) it is the tuned lens."""
    c = model.config
    ids = model.check_tokens(tokens)
    allowed = [n for n in ("ffn_inp", "sa_out", "l_out") if n in c.layer_probes]
    bad = [n for n in probes if n not in allowed]
    if bad or not probes:
        raise InvalidInputError(f"lens probe {bad[0] if bad else ''!r}: must be a residual-stream probe: {', '.join(allowed)}")
    if not 1 <= k <= c.vocab_size:
        raise InvalidInputError(f"k: must be 1..{c.vocab_size}, not {k}")
    if target is not None and not 0 <= target < c.vocab_size:
        raise InvalidInputError(f"target: token id {target} is outside the vocabulary 0..{c.vocab_size - 1}")
    order = [n for n in allowed if n in probes]  # in execution order within a layer
    if translators is not None and order != ["l_out"]:
        raise InvalidInputError("the tuned lens reads l_out only")
    _, caps = forward_capture_jit(model.params, jnp.asarray(ids)[None], c, probes=ProbeSpec(capture=tuple(order)))
    resid = jnp.stack([caps[n][:, 0] for n in order], axis=1).reshape(-1, len(ids), c.d_model)  # [L*P, T, D]
    extra = "l_out" not in order  # the final layer's l_out closes the read-outs: the model's own distribution
    if extra:
        _, last = forward_capture_jit(model.params, jnp.asarray(ids)[None], c,
                                      probes=ProbeSpec(capture=("l_out",), capture_layers=(c.n_layer - 1,)))
        resid = jnp.concatenate([resid, last["l_out"][:, 0]])
    if translators is not None:
        resid = translators.apply(resid)
    targets = np.full(len(ids), -1 if target is None else target, np.int64)
    if target is None:
        targets[:-1] = ids[1:]
    out = lens_stats(model.params, resid, jnp.asarray(targets, jnp.int32), c, k, lens_chunk(resid.shape[0], c.vocab_size))
    out = {key: np.asarray(v)[: resid.shape[0] - extra] for key, v in out.items()}
    return Lens([i for i in range(c.n_layer) for _ in order], [n for _ in range(c.n_layer) for n in order],
                [int(i) for i in ids], [int(i) for i in targets], **out)


def plot_lens(lens: Lens, piece: Callable[[int], str], path: str) -> None:
    """A read-out x position heatmap of the target's probability, the top token in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, t = lens.target_prob.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * t + 2), max(4, 0.32 * r + 1.5)))
    im = ax.imshow(np.nan_to_num(lens.target_prob, nan=0.0), aspect="auto", origin="lower", cmap="viridis",
                   vmin=0, vmax=1)
    if r * t <= 2500:
        for i in range(r):
            for j in range(t):
                ax.text(j, i, piece(int(lens.top_ids[i, j, 0]))[:8], ha="center", va="center", fontsize=6, color="w")
    ax.set_xticks(range(t), [piece(i)[:10] for i in lens.tokens], rotation=60, fontsize=7)
    ax.set_yticks(range(r), [f"{lay} {p}" if p != "l_out" else str(lay) for lay, p in zip(lens.layers, lens.probes)],
                  fontsize=6)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: probability of the target (top token in each cell)")
    fig.colorbar(im, ax=ax, label="target probability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
