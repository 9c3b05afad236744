"""`jaxllama bench --only device`: speed on the JAX backend at hand (GPU, TPU or CPU), no llama.cpp.

llama.cpp is the reference on CPUs; on an accelerator the figures that say how good a run is are
the share of the memory bandwidth a decode step reaches and which kernels XLA compiled. Per weight
layout: prefill tokens/s (1 x 128, 1 x 512, 8 x 512), greedy decode tokens/s at 1 and 8 rows, the
bytes one decode step must read (every weight once, the tied head's embedding included, plus the
visible KV cache) times steps/s, next to a device copy measured in the same run, and the counts
of matrix kernels in the compiled prefill and decode step (`hlo.kernel_counts`), with the float32
weight matrices that exist outside fusions (none means the dequantization is fused).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np

from .common import timed


def copy_gb_s(repeats: int) -> float:
    """Device memory bandwidth of `y = 2 * x` (bytes read plus written), GB/s."""
    import jax
    import jax.numpy as jnp

    n = 2**28  # 1 GiB: larger than any cache
    x = jnp.ones(n, jnp.float32)
    double = jax.jit(lambda a: a * 2)
    jax.block_until_ready(double(x))
    t, _ = timed(lambda: jax.block_until_ready(double(x)), max(repeats, 5))
    return round(2 * 4 * n / t / 1e9, 1)


def weight_bytes(params: Any, config: Any) -> int:
    """Bytes a decode step reads from the parameters: all of them, except the embedding table
    when a separate output matrix exists (then only one row per token is read)."""
    import jax

    p = params["params"]
    skip = "token_embd" if not config.tied_output else None
    return sum(leaf.nbytes for key, sub in p.items() if key != skip for leaf in jax.tree.leaves(sub))


def matrix_shapes(params: Any) -> list[str]:
    """HLO spellings `f32[N,K]` of every native weight matrix, to look for outside fusions."""
    import jax

    from ..gguf.convert import is_native

    leaves = jax.tree.leaves(params, is_leaf=is_native)
    return sorted({f"f32[{w.rows},{w.width}]" for w in leaves if is_native(w)})


def compiled_kernels(model: Any) -> dict[str, Any]:
    """Matrix kernels of the compiled prefill (1 x 128) and decode step, and built weight matrices."""
    import jax
    import jax.numpy as jnp

    from ..hlo import kernel_counts, unfused
    from ..model import forward, forward_step, init_cache

    m = model
    prefill = jax.jit(forward, static_argnames="config").lower(
        m.params, jnp.zeros((1, 128), jnp.int32), m.config).compile().as_text()
    cache = init_cache(m.config, 1, 256)
    step = jax.jit(forward_step, static_argnames="config").lower(
        m.params, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(3), jnp.zeros(1, jnp.int32), m.config).compile().as_text()
    shapes = matrix_shapes(m.params)
    out: dict[str, Any] = {}
    for name, text in (("prefill", prefill), ("decode_step", step)):
        out[name] = {**kernel_counts(text), "built_weight_matrices": [s for s in shapes if s in unfused(text)]}
    return out


def bench_device(models: dict, repeats: int, n_new: int) -> dict[str, Any]:
    """Prefill and decode speed per layout on the default backend, with the decode step's share of
    the measured copy bandwidth and the compiled kernels."""
    import jax
    import jax.numpy as jnp

    from ..generation import Sampler, generate
    from ..model import forward_jit

    rng = np.random.default_rng(0)
    greedy = Sampler(temperature=0.0)
    out: dict[str, Any] = {"device_kind": jax.devices()[0].device_kind, "copy_gb_s": copy_gb_s(repeats)}
    t0 = time.perf_counter()

    def log(what: str, value: Any) -> None:  # each figure as it comes: a time limit keeps the earlier ones
        print(f"device bench {time.perf_counter() - t0:7.1f}s {what}: {value}", file=sys.stderr, flush=True)

    log("copy_gb_s", out["copy_gb_s"])
    for layout, m in models.items():
        c, row = m.config, {}
        for b, n in ((1, 128), (1, 512), (8, 512)):
            batch = jnp.asarray(rng.integers(0, c.vocab_size, size=(b, n)), jnp.int32)
            jax.block_until_ready(forward_jit(m.params, batch, c))
            t, _ = timed(lambda: jax.block_until_ready(forward_jit(m.params, batch, c)), repeats)
            row[f"prefill_{b}x{n}_tok_s"] = round(b * n / t, 1)
            log(f"{layout} prefill_{b}x{n}_tok_s", row[f"prefill_{b}x{n}_tok_s"])
        prompt = m.tokenizer.encode("The history of the printing press begins in the fifteenth century")
        weights = weight_bytes(m.params, c)
        row["weight_mb"] = round(weights / 1e6, 1)
        for rows in (1, 8):
            batch = [prompt] * rows
            generate(m, batch, n_new, greedy, stop_at_eog=False)  # compile
            rate = statistics.median(generate(m, batch, n_new, greedy, stop_at_eog=False).decode_tok_s
                                     for _ in range(repeats))
            kv = rows * 2 * c.n_layer * c.n_head_kv * c.head_dim * 4 * (len(prompt) + n_new / 2)  # mean visible
            gb_s = (weights + kv) * rate / rows / 1e9
            row[f"decode_{rows}_tok_s"] = round(rate, 1)
            row[f"decode_{rows}_read_gb_s"] = round(gb_s, 1)
            row[f"decode_{rows}_share_of_copy"] = round(gb_s / out["copy_gb_s"], 3)
            log(f"{layout} decode_{rows}", {k: v for k, v in row.items() if k.startswith(f"decode_{rows}")})
        row["kernels"] = compiled_kernels(m)
        log(f"{layout} kernels", row["kernels"])
        out[layout] = row
    return out
