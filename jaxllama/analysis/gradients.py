"""Gradients of a scalar metric with respect to probe activations, and attribution patching.

`probe_gradients` differentiates a metric of the last position's logits (a logit difference, a
probability, a log-probability, or any function of the logits that returns a scalar) with
respect to a probe's activation at every layer and position, in one forward and one backward pass
of the model's own scan body: a zero added to the probe (`Intervention`) is what is
differentiated, so `d metric / d delta` is `d metric / d probe`. Quantized matrices stay blocks:
their products have a custom derivative whose transpose is computed from the same blocks
(`model._linear_in_rows`), so no float copy of the weights is made.

`attribution_sweep` is attribution patching (Nanda 2023; Syed et al. 2023): the first-order
estimate of every cell of a patching sweep, `grad(corrupted) . (clean - corrupted)` at that cell,
normalised like `patch_sweep`'s grid, from one forward of the clean prompt and one forward and
backward of the corrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidInputError
from ..gguf.config import LlamaConfig
from ..model import Run, positions_and_mask, run_model
from ..tracing.probes import Intervention, ProbeSpec, probe_shape
from .patching import Sweep, check_sweep, make_sweep

METRICS = ("logit_diff", "prob", "log_prob")

Metric = Callable[[jax.Array], jax.Array]  # last position's logits [V] -> scalar


def logit_diff(answer: int, wrong: int) -> Metric:
    """`logits[answer] - logits[wrong]`."""
    return _Named("logit_diff", lambda z: z[answer] - z[wrong], (answer, wrong))


def prob(answer: int) -> Metric:
    """The softmax probability of `answer`."""
    return _Named("prob", lambda z: jax.nn.softmax(z)[answer], (answer,))


def log_prob(answer: int) -> Metric:
    """The log-probability of `answer`."""
    return _Named("log_prob", lambda z: jax.nn.log_softmax(z)[answer], (answer,))


@dataclass(frozen=True)
class _Named:
    """A built-in metric: equal (and hashed) by name and tokens, so repeats share one compiled program."""

    name: str
    fn: Callable[[jax.Array], jax.Array] = field(compare=False)
    tokens: tuple[int, ...] = ()

    def __call__(self, logits: jax.Array) -> jax.Array:
        return self.fn(logits)


def metric_named(name: str, answer: int, wrong: int | None) -> Metric:
    """The metric `name` (`logit_diff`, `prob`, `log_prob`) of token ids checked by `check_sweep`."""
    return {"logit_diff": lambda: logit_diff(answer, wrong), "prob": lambda: prob(answer),
            "log_prob": lambda: log_prob(answer)}[name]()


@partial(jax.jit, static_argnames=("config", "probes", "metric", "grad"))
def _metric_run(params: Any, tokens: jax.Array, config: LlamaConfig, probes: tuple[str, ...], metric: Metric,
                grad: bool = True) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """The metric of `tokens [T]`, its gradients with respect to `probes` (`{probe: [L, T, X]}`;
    empty without `grad`) and the probes' values (`[L, T, X]`), in one forward (and backward)."""
    c, t = config, tokens.shape[0]
    rows = tokens[None]
    positions, vis = positions_and_mask(rows, None)

    def run(deltas: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        adds = tuple(Intervention(p, lambda x, ctx, p=p: x + deltas[p][ctx["layer"]]) for p in deltas)
        spec = ProbeSpec(capture=probes, interventions=adds)
        logits, caps, _ = run_model(params, rows, c, Run(spec, last_only=True), positions, vis, vis.key_ok)
        return metric(logits[0, -1]), {p: caps[p][:, 0] for p in probes}

    if not grad:
        value, values = run({})
        return value, {}, values
    zeros = {p: jnp.zeros((c.n_layer, *probe_shape(p, c, 1, t)), jnp.float32) for p in probes}
    (value, values), grads = jax.value_and_grad(run, has_aux=True)(zeros)
    return value, {p: g[:, 0] for p, g in grads.items()}, values


def check_metric(model: Any, metric: Metric) -> None:
    """A metric must map the logits `[V]` to one float: else a typed error, before compiling."""
    try:
        out = jax.eval_shape(metric, jax.ShapeDtypeStruct((model.config.vocab_size,), jnp.float32))
    except Exception as e:  # noqa: BLE001 - a user's function: any failure is bad input
        raise InvalidInputError(f"metric: fails on the logits [{model.config.vocab_size}]: {e}") from None
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise InvalidInputError(f"metric: must return a scalar float, not {getattr(out, 'shape', type(out))}")


@dataclass(frozen=True)
class Gradients:
    """`grads[probe]`: `[layers, T, X]`, d metric / d activation; `value`: the metric."""

    value: float
    grads: dict[str, np.ndarray]


def probe_gradients(model: Any, tokens: Sequence[int], metric: Metric, probes: Sequence[str] = ("l_out",)) -> Gradients:
    """The metric of the last position's logits and its gradient with respect to each probe's
    activation at every layer and position (one forward, one backward)."""
    ids = model.check_tokens(tokens)
    names = tuple(dict.fromkeys(probes))
    for p in names:
        if p not in model.config.layer_probes:
            raise InvalidInputError(f"probe {p!r}: must be a layer probe ({', '.join(model.config.layer_probes)})")
    check_metric(model, metric)
    value, grads, _ = _metric_run(model.params, jnp.asarray(ids), model.config, names, metric)
    return Gradients(float(value), {p: np.asarray(g) for p, g in grads.items()})


def attribution_sweep(model: Any, clean: Sequence[int], corrupted: Sequence[int], answer: int,
                      wrong: int | None = None, probe: str = "l_out", metric: str = "logit_diff") -> Sweep:
    """Attribution patching: `patch_sweep`'s grid estimated to first order, each cell
    `grad . (clean - corrupted)` there (per head: over that head's slice of `kqv_out`) over
    `metric_clean - metric_corrupted`."""
    c = model.config
    a, b = check_sweep(model, clean, corrupted, answer, wrong, probe, metric, METRICS)
    m = metric_named(metric, answer, wrong)
    start = time.perf_counter()
    m_clean, _, clean_values = _metric_run(model.params, jnp.asarray(a), c, (probe,), m, grad=False)
    value, grads, corrupted_values = _metric_run(model.params, jnp.asarray(b), c, (probe,), m)
    terms = np.asarray(grads[probe]) * (np.asarray(clean_values[probe]) - np.asarray(corrupted_values[probe]))
    if probe == "kqv_out":
        est = terms.reshape(c.n_layer, len(b), c.n_head, -1).sum(axis=(1, 3))
    else:
        est = terms.sum(axis=-1)
    return make_sweep(probe, metric, c.n_layer, est, float(m_clean), float(value), start)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two grids (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64).ravel()
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])
