"""The tuned lens (Belrose et al. 2023): one affine translator per layer, trained so that the final
norm and output applied to the translated residual stream match the model's final distribution.

Layer l's translator maps `h` to `h + h @ A_l + b_l` (zero-initialised: it starts as the logit
lens). The last layer has none: its logit lens is the model's own distribution. Training
minimises the mean over layers and positions of KL(final ‖ lens), with Adam (optax), on the
`l_out` streams of a text captured once (the model is frozen), a random batch of positions per
jitted step. The output matrix is widened to float32 once for training (the gradient flows
through the norm and the product only); read-outs go through the exact head (`lens.lens_stats`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import InvalidInputError
from ..model import forward_capture_jit, output_kernel, rms_norm
from ..tracing.probes import ProbeSpec
from .attention import matrix_in_out

FORMAT = "jaxllama-tuned-lens-1"


@dataclass(frozen=True)
class Translators:
    """`a [L-1, D, D]`, `b [L-1, D]` for layers 0..L-2, and the model they were trained for."""

    a: np.ndarray
    b: np.ndarray
    model_sha256: str
    steps: int

    def apply(self, resid: jax.Array) -> jax.Array:
        """Translate read-outs `[L, T, D]` (the last layer's is kept as it is)."""
        head = resid[:-1] + jnp.einsum("ltd,lde->lte", resid[:-1], self.a, precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([head + self.b[:, None], resid[-1:]])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "wb") as fh:  # np.savez(path) would add ".npz" to a name without it
            np.savez(fh, format=np.array(FORMAT), a=self.a, b=self.b, model_sha256=np.array(self.model_sha256),
                     steps=np.array(self.steps))
        return path


def load_translators(path: str | Path, model: Any) -> Translators:
    """Translators saved by `Translators.save`, checked against `model` (`InvalidInputError`)."""
    c = model.config
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise InvalidInputError(f"{path}: not a jaxllama tuned-lens file")
            t = Translators(z["a"].astype(np.float32), z["b"].astype(np.float32), str(z["model_sha256"]),
                            int(z["steps"]))
    except (OSError, KeyError, ValueError) as e:
        raise InvalidInputError(f"{path}: cannot read tuned-lens translators ({type(e).__name__})") from None
    want = (c.n_layer - 1, c.d_model, c.d_model)
    if t.a.shape != want or t.b.shape != want[:2]:
        raise InvalidInputError(f"{path}: translators for {t.a.shape[0] + 1} layers of width {t.a.shape[-1]}, "
                                f"this model has {c.n_layer} of width {c.d_model}")
    if t.model_sha256 != model.sha256:
        print(f"jaxllama: warning: {path} was trained on another model file (sha256 {t.model_sha256[:12]}...)",
              file=sys.stderr)
    return t


def streams(model: Any, tokens: Sequence[int], ctx: int) -> np.ndarray:
    """Every layer's `l_out` over `tokens` cut into rows of `ctx`: `[L, N, D]` float32."""
    c = model.config
    ids = list(tokens)
    rows = [ids[i: i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)] or [ids]
    out = []
    for row in rows:
        row = model.check_tokens(row)
        _, caps = forward_capture_jit(model.params, jnp.asarray(row)[None], c, probes=ProbeSpec(capture=("l_out",)))
        out.append(np.asarray(caps["l_out"][:, 0]))
    return np.concatenate(out, axis=1)


def _log_probs(h: jax.Array, w: jax.Array, scale: jax.Array, eps: float, bias: jax.Array | None) -> jax.Array:
    """Log-probabilities of residual streams `h [..., D]` through the final norm (its plain
    float32 form: a training loss needs no llama.cpp rounding) and the float output `w [D, V]`."""
    logits = rms_norm(h, scale, eps, ggml=False) @ w
    return jax.nn.log_softmax(logits if bias is None else logits + bias, axis=-1)


@partial(jax.jit, static_argnames=("eps", "optimizer"), donate_argnums=(0, 1))
def _step(params: dict, opt_state: Any, batch: jax.Array, w: jax.Array, scale: jax.Array, bias: jax.Array | None,
          eps: float, optimizer: Any) -> tuple[dict, Any, jax.Array]:
    """One Adam step on a batch of positions `[L, n, D]`."""
    final = _log_probs(batch[-1], w, scale, eps, bias)  # [n, V], no gradient needed

    def loss(prm: dict) -> jax.Array:
        h = batch[:-1] + jnp.einsum("lnd,lde->lne", batch[:-1], prm["a"]) + prm["b"][:, None]
        lp = _log_probs(h, w, scale, eps, bias)  # [L-1, n, V]
        return jnp.mean(jnp.sum(jnp.exp(final)[None] * (final[None] - lp), axis=-1))

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def train_translators(model: Any, tokens: Sequence[int], steps: int = 200, batch: int = 32, ctx: int = 128,
                      lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Translators:
    """Fit tuned-lens translators on `tokens` (`steps` Adam steps of `batch` random positions)."""
    c = model.config
    if steps < 1 or batch < 1 or ctx < 2:
        raise InvalidInputError("steps and batch must be at least 1, ctx at least 2")
    if c.n_layer < 2:
        raise InvalidInputError("a tuned lens needs at least two layers")
    data = jnp.asarray(streams(model, tokens, min(ctx, c.context_length)))  # [L, N, D]
    p = model.params["params"]
    w, scale = matrix_in_out(output_kernel(p, c)), p["output_norm"]["scale"]
    bias = p.get("output", {}).get("bias")
    optimizer = optax.adam(lr)
    params = {"a": jnp.zeros((c.n_layer - 1, c.d_model, c.d_model)), "b": jnp.zeros((c.n_layer - 1, c.d_model))}
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="tuned lens", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())
    for _ in range(steps):
        pick = jnp.asarray(rng.integers(0, data.shape[1], size=min(batch, data.shape[1])))
        params, opt_state, value = _step(params, opt_state, data[:, pick], w, scale, bias, c.rms_eps, optimizer)
        if bar is not None:
            bar.set_postfix(kl=f"{float(value):.3f}")
            bar.update()
    if bar is not None:
        bar.close()
    return Translators(np.asarray(params["a"]), np.asarray(params["b"]), model.sha256, steps)


def held_out_kl(model: Any, tokens: Sequence[int], translators: Translators, ctx: int = 128) -> dict[str, list[float]]:
    """Mean KL(final ‖ lens) per layer over `tokens`, for the logit lens and the tuned lens."""
    from .lens import lens_chunk, lens_stats

    c = model.config
    resid = jnp.asarray(streams(model, tokens, min(ctx, c.context_length)))
    none = jnp.full(resid.shape[1], -1, jnp.int32)
    chunk = lens_chunk(c.n_layer, c.vocab_size)
    out = {}
    for name, r in (("logit", resid), ("tuned", translators.apply(resid))):
        kl = lens_stats(model.params, r, none, c, 1, chunk)["kl_to_final"]
        out[name] = [float(v) for v in np.asarray(kl).mean(axis=1)]
    return out
