"""Activation patching sweeps: where does a clean prompt's computation restore a corrupted one?

For every cell (layer x position of a residual-stream or branch probe, or layer x head of
`kqv_out`), the corrupted prompt runs with that one cell replaced by its value in the clean run;
the metric at the last position (a logit difference of two tokens, or a token's probability) is
reported normalised: `(patched - corrupted) / (clean - corrupted)`, 1 meaning fully restored.

The sweep is batched: the cells of one layer go `batch` at a time through one jitted forward,
each row of the batch patching its own cell through one intervention that reads the row's
(layer, position or head) from a table, so one compiled program serves every batch. Each
forward resumes from the corrupted run's residual stream entering the patched layer
(`run_model(resume=...)`): the layers before it, the same in every row, are not recomputed,
which halves the work of a sweep. A cell whose clean value equals the corrupted run's bit for bit
(every position before the first differing token, by causality) changes nothing: its metric is the
corrupted run's, exactly, and it is not run. Each cell equals one run of `interventions.patch` with
the clean value put at that cell (tests/test_circuits.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidInputError
from ..gguf.config import LlamaConfig
from ..model import Run, forward_capture, head, positions_and_mask, run_model
from ..tracing.probes import Intervention, ProbeSpec

METRICS = ("logit_diff", "prob")
PROBES = ("l_out", "attn_out", "attn_post_norm", "ffn_out", "ffn_post_norm", "ffn_inp", "sa_out", "kqv_out")


@partial(jax.jit, static_argnames=("config", "probe", "per_head", "metric"))
def patched_metric(params: Any, tokens: jax.Array, entering: jax.Array, start: jax.Array, clean: jax.Array,
                   cell_layer: jax.Array, cell_index: jax.Array, answer: jax.Array, wrong: jax.Array,
                   config: LlamaConfig, probe: str, per_head: bool, metric: str) -> jax.Array:
    """The metric at the last position for each row b of a batch of `tokens [T]`, run from layer
    `start` on (`entering [T, D]`: the residual stream entering it), with probe `probe` at layer
    `cell_layer[b]` and position (or, `per_head`, head) `cell_index[b]` replaced by
    `clean [L, T, X]` there; a row whose `cell_layer` is -1 runs unpatched. `[B]`."""
    c = config
    b, t = cell_layer.shape[0], tokens.shape[0]

    def put_clean(x: jax.Array, ctx: dict) -> jax.Array:  # x [B, T, X]
        value = clean[ctx["layer"]][None]  # [1, T, X]
        here = cell_layer == ctx["layer"]
        if per_head:
            hx, hv = x.reshape(b, t, c.n_head, -1), value.reshape(1, t, c.n_head, -1)
            mask = here[:, None, None, None] & (jnp.arange(c.n_head)[None, None, :, None] == cell_index[:, None, None, None])
            return jnp.where(mask, hv, hx).reshape(x.shape)
        mask = here[:, None, None] & (jnp.arange(t)[None, :, None] == cell_index[:, None, None])
        return jnp.where(mask, value, x)

    rows = jnp.broadcast_to(tokens, (b, t))
    positions, vis = positions_and_mask(rows, None)
    run = Run(ProbeSpec(interventions=(Intervention(probe, put_clean),)), head=False)
    resume = (jnp.broadcast_to(entering, (b, t, c.d_model)), start)
    x, _, _ = run_model(params, rows, c, run, positions, vis, vis.key_ok, resume=resume)
    logits = head(params["params"], x[:, -1:], c, {})[:, 0]  # [B, V]
    if metric == "prob":
        return jax.nn.softmax(logits, axis=-1)[:, answer]
    return logits[:, answer] - logits[:, wrong]


@partial(jax.jit, static_argnames=("config", "probe"))
def run_values(params: Any, tokens: jax.Array, config: LlamaConfig, probe: str) -> tuple[jax.Array, jax.Array]:
    """`probe` at every layer `[L, T, X]` and the residual stream entering every layer `[L, T, D]`."""
    first = "inp_scaled" if "inp_scaled" in config.global_probes else "inp_embd"
    names = tuple(dict.fromkeys((probe, "l_out", first)))
    _, caps = forward_capture(params, tokens[None], config, probes=ProbeSpec(capture=names))
    entering = jnp.concatenate([caps[first], caps["l_out"][:-1, 0]])
    return caps[probe][:, 0], entering


@dataclass(frozen=True)
class Sweep:
    """A patching grid: `grid[layer, position or head]`, normalised (1: clean restored)."""

    probe: str
    metric: str
    layers: list[int]
    positions: list[int] | None
    heads: list[int] | None
    metric_clean: float
    metric_corrupted: float
    grid: np.ndarray
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"probe": self.probe, "metric": self.metric, "layers": self.layers, "positions": self.positions,
                "heads": self.heads, "metric_clean": self.metric_clean, "metric_corrupted": self.metric_corrupted,
                "grid": np.round(self.grid.astype(np.float64), 7).tolist()}


def check_pair(model: Any, clean: Sequence[int], corrupted: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    a, b = model.check_tokens(clean, "clean tokens"), model.check_tokens(corrupted, "corrupted tokens")
    if len(a) != len(b):
        raise InvalidInputError(f"clean and corrupted prompts must have the same number of tokens: {len(a)} and {len(b)}")
    return a, b


def check_sweep(model: Any, clean: Sequence[int], corrupted: Sequence[int], answer: int, wrong: int | None,
                probe: str, metric: str, metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A sweep's inputs checked (one-line errors): the prompt pair's ids, the probe, the metric
    (one of `metrics`) and its answer and wrong tokens."""
    c = model.config
    a, b = check_pair(model, clean, corrupted)
    if probe not in PROBES or probe not in c.layer_probes:
        raise InvalidInputError(f"probe {probe!r}: must be one of {', '.join(p for p in PROBES if p in c.layer_probes)}")
    if metric not in metrics:
        raise InvalidInputError(f"metric: must be one of {', '.join(metrics)}, not {metric!r}")
    for name, tok in (("answer", answer), ("wrong", wrong)):
        if tok is not None and not 0 <= tok < c.vocab_size:
            raise InvalidInputError(f"{name}: token id {tok} is outside the vocabulary 0..{c.vocab_size - 1}")
    if metric == "logit_diff" and wrong is None:
        raise InvalidInputError("the logit_diff metric needs a wrong token")
    return a, b


def make_sweep(probe: str, metric: str, n_layer: int, delta: np.ndarray, m_clean: float, m_corr: float,
               start: float) -> Sweep:
    """A `Sweep` from each cell's change of the metric `delta [L, cells]` (patched - corrupted),
    normalised by `m_clean - m_corr`; `start`: `time.perf_counter()` when the sweep began."""
    span = m_clean - m_corr
    grid = delta / span if span != 0 else np.full_like(delta, np.nan)
    cells = list(range(delta.shape[1]))
    per_head = probe == "kqv_out"
    return Sweep(probe, metric, list(range(n_layer)), None if per_head else cells, cells if per_head else None,
                 m_clean, m_corr, grid, time.perf_counter() - start)


def patch_sweep(model: Any, clean: Sequence[int], corrupted: Sequence[int], answer: int, wrong: int | None = None,
                probe: str = "l_out", metric: str = "logit_diff", batch: int = 16, resume: bool = True,
                skip_unchanged: bool = True) -> Sweep:
    """The patching grid of `probe` over every layer and position (every head for `kqv_out`).
    For measuring what each saving brings (the same numbers within float32 reordering):
    `resume=False` runs every cell's forward from the embedding, `skip_unchanged=False` runs
    also the cells whose clean value is the corrupted one."""
    c = model.config
    a, b = check_sweep(model, clean, corrupted, answer, wrong, probe, metric, METRICS)
    if batch < 1:
        raise InvalidInputError(f"batch: must be at least 1, not {batch}")
    per_head = probe == "kqv_out"
    width = c.n_head if per_head else len(b)
    start = time.perf_counter()
    values, clean_in = run_values(model.params, jnp.asarray(a), c, probe)
    corrupted_values, corrupted_in = run_values(model.params, jnp.asarray(b), c, probe)
    live = _changed_cells(np.asarray(values), np.asarray(corrupted_values), c.n_head if per_head else None)
    live |= not skip_unchanged
    batch = max(1, min(batch, int(live.sum(axis=1).max())))  # no wider than the busiest layer's live cells
    run = partial(patched_metric, model.params, config=c, probe=probe, per_head=per_head, metric=metric,
                  answer=jnp.int32(answer), wrong=jnp.int32(wrong if wrong is not None else 0), clean=values)
    none = {"cell_layer": jnp.full(batch, -1, jnp.int32), "cell_index": jnp.zeros(batch, jnp.int32)}
    m_clean = float(run(jnp.asarray(a), clean_in[0], jnp.int32(0), **none)[0])
    m_corr = float(run(jnp.asarray(b), corrupted_in[0], jnp.int32(0), **none)[0])
    raw = np.full((c.n_layer, width), m_corr)
    for layer in range(c.n_layer):  # one layer's live cells per forward, resumed at that layer
        cells = np.flatnonzero(live[layer])
        for s in range(0, len(cells), batch):
            idx = cells[s: s + batch]
            padded = np.concatenate([idx, np.repeat(idx[-1:], batch - len(idx))])  # one shape: one program
            first = layer if resume else 0
            got = run(jnp.asarray(b), corrupted_in[first], jnp.int32(first), cell_layer=jnp.full(batch, layer, jnp.int32),
                      cell_index=jnp.asarray(padded, jnp.int32))
            raw[layer, idx] = np.asarray(got)[: len(idx)]
    return make_sweep(probe, metric, c.n_layer, raw - m_corr, m_clean, m_corr, start)


def _changed_cells(clean: np.ndarray, corrupted: np.ndarray, heads: int | None) -> np.ndarray:
    """`[L, cells]` True where patching the clean value changes the corrupted run: the values
    `[L, T, X]` differ anywhere in that position (or, `heads`, in that head's slice at any position)."""
    differ = clean != corrupted
    if heads is None:
        return differ.any(axis=-1)
    l, t, x = differ.shape
    return differ.reshape(l, t, heads, x // heads).any(axis=(1, 3))


def plot_sweep(sweep: Sweep, labels: Sequence[str], path: str) -> None:
    """The grid as a layer x position (or head) heatmap, 1 = restored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = sweep.grid
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * g.shape[1] + 2), max(4, 0.25 * g.shape[0] + 1.5)))
    im = ax.imshow(g, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
    if sweep.positions is not None:
        ax.set_xticks(range(g.shape[1]), [s[:10] for s in labels], rotation=60, fontsize=7)
        ax.set_xlabel("position (corrupted token)")
    else:
        ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"patching {sweep.probe}: {sweep.metric} restored")
    fig.colorbar(im, ax=ax, label="fraction restored")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
