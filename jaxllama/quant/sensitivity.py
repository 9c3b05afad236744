"""What quantizing each part of a model costs its output distribution, measured end to end.

`sensitivity(model, text, types, group)` quantizes one group of tensors at a time to each type
(llama.cpp's bytes, `jaxllama.quant`; the rest of the model at base precision), runs the text as
llama-perplexity's chunks and reports KL(base || candidate) over the scored positions (mean, p99,
top-1 agreement: `kl-divergence`'s statistics) and the group's bytes at that type. Groups:
`layer` (a layer's matrices; token_embd and output alone), `tensor` (one matrix), `class` (one
kind of matrix across all layers).

The work is shared: the base log-probabilities and the residual stream entering every layer are
computed once; a candidate whose first changed tensor is in layer l resumes from the base
stream entering l (exact: the layers before it are the base's), jitted once for all candidates.
Next to each measured KL, a second-order estimate from the Fisher diagonal of the base run,
`1/2 * sum F_i * (dequant(quant(w_i)) - w_i)^2`, with targets sampled from the base's own
distribution (so the empirical Fisher is unbiased), one gradient per chunk.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidInputError
from ..gguf.convert import LAYER_MATRICES
from ..analysis import rank_correlation
from ..model import Run, head, positions_and_mask, run_model
from ..scoring.kernels import _head_blocks, kl_reduce
from ..scoring.kld import kl_summary
from ..scoring.perplexity import bos_for, chunk_rows, text_tokens
from ..tracing.probes import ProbeSpec
from . import parse_type, quantize
from .file import allows_quantization, row_bytes, with_fallback

T = gguf.GGMLQuantizationType
GROUPS = ("layer", "tensor", "class")
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def quantizable(model: Any) -> dict[str, tuple[int, ...]]:
    """The tensors llama-quantize would quantize, in its order: name -> numpy-order shape."""
    from ..gguf.reader import read_gguf
    from .file import llama_order

    f = read_gguf(model.source)
    names = [n for n, t in f.tensors.items() if allows_quantization(n, len(t.shape))]
    return {n: f.tensors[n].shape for n in llama_order(names)}


def group_tensors(names: Sequence[str], group: str) -> dict[str, list[str]]:
    """Group name -> its tensors: `blk.3` / `blk.3.attn_q` / `attn_q`, and token_embd / output alone."""
    if group not in GROUPS:
        raise InvalidInputError(f"--group {group!r}: choose layer, tensor or class")
    out: dict[str, list[str]] = {}
    for n in names:
        m = _LAYER.match(n)
        if not m:
            key = n[: -len(".weight")]
        elif group == "layer":
            key = f"blk.{m.group(1)}"
        elif group == "tensor":
            key = n[: -len(".weight")]
        else:
            key = m.group(2)
        out.setdefault(key, []).append(n)
    return out


@dataclass
class Cell:
    group: str
    type: str
    types: dict[str, int]  # the types written (llama.cpp's fallbacks included): tensor count
    bytes: int
    base_bytes: int
    kld_mean: float
    kld_p99: float
    same_top: float
    estimate: float

    @property
    def kl_per_byte_saved(self) -> float:
        saved = self.base_bytes - self.bytes
        return self.kld_mean / saved if saved > 0 else float("inf")


@dataclass
class Sensitivity:
    group: str
    types: list[str]
    cells: list[Cell]
    positions: int
    rank_correlation: float
    seconds: float
    base_bytes: int
    timings: dict[str, float] = field(default_factory=dict)

    def grid(self, key: str = "kld_mean") -> tuple[list[str], np.ndarray]:
        groups = list(dict.fromkeys(c.group for c in self.cells))
        g = np.full((len(groups), len(self.types)), np.nan)
        for c in self.cells:
            g[groups.index(c.group), self.types.index(c.type)] = getattr(c, key)
        return groups, g

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "types": self.types, "positions": self.positions,
                "rank_correlation": self.rank_correlation, "seconds": self.seconds, "base_bytes": self.base_bytes,
                "timings": self.timings,
                "cells": [{**c.__dict__, "kl_per_byte_saved": c.kl_per_byte_saved} for c in self.cells]}


# ---- the jitted programs ------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("config",))
def _base_pass(params: Any, tokens: jax.Array, at: jax.Array, config: Any) -> tuple[jax.Array, jax.Array]:
    """(the residual stream entering every layer and after the last `[L+1, B, T, D]`, the base
    log-softmax at positions `at` `[B, N, V]`)."""
    c = config
    positions, vis = positions_and_mask(tokens, None)
    first = "inp_scaled" if "inp_scaled" in c.global_probes else "inp_embd"  # the stream entering layer 0
    spec = ProbeSpec(capture=(first, "l_out"))
    x, caps, _ = run_model(params, tokens, c, Run(spec, head=False), positions, vis, vis.key_ok)
    entering = jnp.concatenate([caps[first][None], caps["l_out"]])
    h = jnp.take_along_axis(x, at[:, :, None], axis=1)
    lp = _head_blocks(params, h, c, (), lambda logits: logits - jax.nn.logsumexp(logits, -1, keepdims=True))
    return entering, lp


@partial(jax.jit, static_argnames=("config", "from_embedding"))
def _candidate(params: Any, swaps: dict, tokens: jax.Array, entering: jax.Array, start: jax.Array, at: jax.Array,
               targets: jax.Array, base_lp: jax.Array, config: Any, from_embedding: bool) -> dict[str, jax.Array]:
    """KL(base || candidate) per scored position, the target's nll under both, top-1 agreement.

    The candidate is `params` with `swaps` put in place inside the program (`{"layers/attn_q":
    [in, out]}` replaces layer `start`'s matrix; a stacked `[L, in, out]` or a global leaf replaces
    the whole leaf). The layers from `start` on run from the base stream `entering [B, T, D]` (or
    everything from the embedding when the embedding itself changed)."""
    c = config
    for key, new in swaps.items():
        path = tuple(key.split("/"))
        old = _get(params, path)
        params = _set(params, path, old.at[start].set(new) if new.ndim < old.ndim else new)
    positions, vis = positions_and_mask(tokens, None)
    resume = None if from_embedding else (entering, start)
    x, _, _ = run_model(params, tokens, c, Run(ProbeSpec(), head=False), positions, vis, vis.key_ok, resume=resume)
    h = jnp.take_along_axis(x, at[:, :, None], axis=1)
    return _head_blocks(params, h, c, (), kl_reduce, targets, base_lp)


@partial(jax.jit, static_argnames=("config",))
def _sampled_nll_grad(params: Any, tokens: jax.Array, at: jax.Array, sampled: jax.Array, config: Any) -> Any:
    """d/dparams of the summed nll of `sampled` targets at positions `at` (one chunk per row)."""
    def loss(p: Any) -> jax.Array:
        positions, vis = positions_and_mask(tokens, None)
        x, _, _ = run_model(p, tokens, config, Run(ProbeSpec(), head=False), positions, vis, vis.key_ok)
        h = jnp.take_along_axis(x, at[:, :, None], axis=1)
        logits = head(p["params"], h, config, {})
        lp = logits - jax.nn.logsumexp(logits, -1, keepdims=True)
        return -jnp.sum(jnp.take_along_axis(lp, sampled[..., None], axis=-1))

    return jax.grad(loss)(params)


# ---- tensors in and out of the parameter pytree ---------------------------------------------------

def _leaf_of(name: str) -> tuple[tuple[str, ...], int | None]:
    """Pytree path of a matrix and its layer (None for global tensors)."""
    m = _LAYER.match(name)
    if m:
        return ("layers", m.group(2), "kernel"), int(m.group(1))
    if name == "token_embd.weight":
        return ("token_embd", "embedding"), None
    return ("output", "kernel"), None


def _get(params: Any, path: tuple[str, ...]) -> Any:
    node = params["params"]
    for k in path:
        node = node[k]
    return node


def _set(params: Any, path: tuple[str, ...], value: Any) -> Any:
    def put(node: dict, keys: tuple[str, ...]) -> dict:
        return {**node, keys[0]: value if len(keys) == 1 else put(node[keys[0]], keys[1:])}

    return {**params, "params": put(params["params"], path)}


def base_matrix(params: Any, name: str) -> np.ndarray:
    """A matrix of float32 params in GGUF's orientation `[out, in]` (rows of n_per_row values)."""
    path, layer = _leaf_of(name)
    a = _get(params, path)
    a = a[layer] if layer is not None else a
    return np.asarray(a if path[-1] == "embedding" else a.T, np.float32)


def _swaps(params: Any, values: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The `_candidate` swaps for matrices (GGUF orientation): one layer's `[in, out]` per leaf when
    they are all in one layer, else whole stacked leaves; global tensors whole."""
    out: dict[str, Any] = {}
    layers = {_leaf_of(n)[1] for n in values} - {None}
    for name, v in values.items():
        path, layer = _leaf_of(name)
        key = "/".join(path)
        v = v if path[-1] == "embedding" else v.T
        if layer is None or len(layers) == 1:
            out[key] = v
        else:  # several layers of one class: the whole stack, base values elsewhere
            if key not in out:
                out[key] = np.array(_get(params, path))
            out[key][layer] = v
    return {k: jnp.asarray(v) for k, v in out.items()}


# ---- the sweep ------------------------------------------------------------------------------------

def check_base(model: Any, types: Sequence[T], names: Sequence[str]) -> None:
    """The base's tensors `names` must be float (or quantized with more bits than every candidate type)."""
    bpw = {t: 8 * gguf.GGML_QUANT_SIZES[t][1] / gguf.GGML_QUANT_SIZES[t][0] for t in T if t in gguf.GGML_QUANT_SIZES}
    floor = max(bpw[t] for t in types)
    for name in names:
        tname = model.tensor_types[name]
        t = T[tname]
        if t not in (T.F32, T.F16, T.BF16) and bpw[t] <= floor:
            raise InvalidInputError(f"{model.source}: tensor {name} is already {tname} ({bpw[t]:.2f} bits per weight), "
                                    f"not above the candidate types; use an F32, F16 or BF16 base")


def sensitivity(model: Any, text: str | Sequence[int], types: Sequence[str], group: str = "layer", ctx: int = 512,
                chunks: int | None = None, batch: int = 2, imatrix: dict[str, np.ndarray] | None = None,
                seed: int = 0, progress: Callable[[str], None] | None = None,
                only: Sequence[str] | None = None, estimate: bool = True) -> Sensitivity:
    """The sweep described in the module docstring. `model` must hold float32 weights
    (`jaxllama.load(path, weights="float32")`); `only` limits it to some groups (by name);
    `estimate=False` skips the Fisher estimate (its gradients)."""
    t_start = time.perf_counter()
    qtypes = [parse_type(t, "--types") for t in types]
    if not qtypes:
        raise InvalidInputError("--types: give at least one type")
    shapes = quantizable(model)
    check_base(model, qtypes, list(shapes))
    if model.dtype != "float32":
        raise InvalidInputError("sensitivity needs the base's float32 weights (load with weights='float32')")
    groups = group_tensors(list(shapes), group)
    if only is not None:
        unknown = [g for g in only if g not in groups]
        if unknown:
            raise InvalidInputError(f"no group {unknown[0]!r} in a {group} sweep; groups: {', '.join(groups)}")
        groups = {g: groups[g] for g in only}
        shapes = {n: shapes[n] for g in groups.values() for n in g}
    c = model.config
    rows = chunk_rows(text_tokens(model, text), ctx, chunks, bos_for(model))
    tokens = np.stack([r.tokens for r in rows])
    at = np.stack([r.at for r in rows]).astype(np.int32)
    targets = np.stack([r.targets for r in rows]).astype(np.int32)
    n = len(rows)
    b = max(1, min(batch, n))
    pad = (-n) % b
    idx = np.concatenate([np.arange(n), np.zeros(pad, int)])  # a short last batch repeats row 0 (dropped)
    batches = [idx[i:i + b] for i in range(0, len(idx), b)]
    params = model.params
    timings: dict[str, float] = {}

    # 1. the base run, once: the stream entering each layer, the log-softmax at the scored positions
    t0 = time.perf_counter()
    entering, base_lp = [], []
    for bi in batches:
        e, lp = _base_pass(params, jnp.asarray(tokens[bi]), jnp.asarray(at[bi]), c)
        entering.append(np.asarray(e))
        base_lp.append(lp)
    timings["base_s"] = time.perf_counter() - t0

    # 2. the Fisher diagonal from one gradient per chunk, targets sampled from the base
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    fisher: dict[str, np.ndarray] = {}
    for k, bi in enumerate(batches if estimate else []):
        lp = np.asarray(base_lp[k], np.float64)
        u = rng.random(lp.shape[:2])[..., None]
        sampled = (np.cumsum(np.exp(lp), axis=-1) < u).sum(-1).clip(0, c.vocab_size - 1).astype(np.int32)
        for j, row in enumerate(bi[: b if k < len(batches) - 1 else b - pad]):  # not the padding rows
            g = _sampled_nll_grad(params, jnp.asarray(tokens[row][None]), jnp.asarray(at[row][None]),
                                  jnp.asarray(sampled[j][None]), c)
            for name in shapes:
                sq = base_matrix(g, name) ** 2
                fisher[name] = sq if name not in fisher else fisher[name] + sq
    positions = n * at.shape[1]
    fisher = {k: v / positions for k, v in fisher.items()}
    timings["fisher_s"] = time.perf_counter() - t0

    # 3. each type: every quantizable tensor quantized once, then each group swapped in and run
    base_bytes_of = {name: int(np.prod(s)) * 4 for name, s in shapes.items()}  # the float32 base
    cells: list[Cell] = []
    timings["quantize_s"], timings["candidates_s"] = 0.0, 0.0
    for qt in qtypes:
        t0 = time.perf_counter()
        deq, used, nbytes, est = {}, {}, {}, {}
        for name, shape in shapes.items():
            w = base_matrix(params, name)
            eff = with_fallback(qt, shape[-1])
            used[name], nbytes[name] = eff.name, row_bytes(eff, shape[-1]) * int(np.prod(shape[:-1]))
            if eff == T.F16:
                deq[name] = w.astype(np.float16).astype(np.float32)
            else:
                blocks = quantize(w, eff, None if imatrix is None else imatrix.get(name))
                deq[name] = gguf.quants.dequantize(blocks, eff).reshape(w.shape).astype(np.float32)
            est[name] = 0.5 * float(np.sum(fisher[name] * (deq[name] - w).astype(np.float64) ** 2)) if estimate else 0.0
        timings["quantize_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for gname, names in groups.items():
            if progress:
                progress(f"{gname} {qt.name}")
            swaps = _swaps(params, {nm: deq[nm] for nm in names})
            layers = [_leaf_of(nm)[1] for nm in names]
            from_embedding = "token_embd.weight" in names
            start = c.n_layer if all(v is None for v in layers) else min(v for v in layers if v is not None)
            out = {"kld": [], "nll": [], "nll_base": [], "same_top": []}
            for k, bi in enumerate(batches):
                r = _candidate(params, swaps, jnp.asarray(tokens[bi]), jnp.asarray(entering[k][start]), jnp.int32(start),
                               jnp.asarray(at[bi]), jnp.asarray(targets[bi]), base_lp[k], c, from_embedding)
                keep = b if k < len(batches) - 1 else b - pad
                for key in out:
                    out[key].append(np.asarray(r[key])[:keep])
            kld, nll, nll_base, same = (np.concatenate(out[k]) for k in ("kld", "nll", "nll_base", "same_top"))
            s = kl_summary(kld, nll, nll_base, same)
            cells.append(Cell(gname, qt.name, dict(sorted(Counter(used[nm] for nm in names).items())),
                              sum(nbytes[nm] for nm in names), sum(base_bytes_of[nm] for nm in names),
                              s["kld_mean"], s["kld_percentiles"]["99"], s["same_top_rate"],
                              sum(est[nm] for nm in names)))
            del swaps
        timings["candidates_s"] += time.perf_counter() - t0
    rho = (rank_correlation(np.array([x.kld_mean for x in cells]), np.array([x.estimate for x in cells]))
           if estimate and len(cells) >= 3 else float("nan"))
    return Sensitivity(group, [t.name for t in qtypes], cells, positions, rho, time.perf_counter() - t_start,
                       sum(base_bytes_of.values()), {k: round(v, 2) for k, v in timings.items()})


def plot_heatmap(result: Sensitivity, path: str) -> None:
    """Layer x tensor class, one panel per type, colour = mean KL per byte saved (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    cells = [c for c in result.cells if _LAYER.match(c.group + ".weight") or c.group.startswith("blk.")]
    classes = [m for m in LAYER_MATRICES if any(c.group.endswith("." + m) for c in cells)]
    layers = sorted({int(c.group.split(".")[1]) for c in cells})
    if not classes:  # a layer sweep: one column per layer group
        classes = ["layer"]
    fig, axes = plt.subplots(1, len(result.types), figsize=(2.2 * len(result.types) + 1.5, 0.18 * len(layers) + 1.6),
                             squeeze=False, sharey=True)
    values = [c.kl_per_byte_saved for c in cells if np.isfinite(c.kl_per_byte_saved) and c.kl_per_byte_saved > 0]
    norm = LogNorm(vmin=min(values), vmax=max(values)) if values else None
    for ax, t in zip(axes[0], result.types):
        g = np.full((len(layers), len(classes)), np.nan)
        for c in cells:
            if c.type != t:
                continue
            parts = c.group.split(".")
            col = classes.index(parts[2]) if len(parts) > 2 else 0
            g[layers.index(int(parts[1])), col] = c.kl_per_byte_saved
        im = ax.imshow(g, aspect="auto", norm=norm, cmap="viridis", interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean KL per byte saved")
    fig.suptitle(f"quantization sensitivity ({result.group} groups, {result.positions} positions)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
