"""Run the jitted forward for a `Model`: check token ids, pad ragged batches, serve the active trace.

This is the one place where `Model.logits` and `Model.logits_batch` meet the pure forward: ids
are validated here (the forward cannot raise inside jit), a ragged batch becomes one padded,
masked call, and the innermost `jaxllama.trace()` recorder, if any, chooses the probes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InvalidInputError
from .gguf.config import LlamaConfig
from .gguf.default_model import cache_dir
from .model import forward_capture_jit
from .parallel.placement import put_rows
from .tracing.recorder import active_recorder


def use_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs in JAX's persistent cache (default: `<jaxllama cache>/xla`), so a
    new process skips compiling what an earlier one compiled. The CLI turns it on; a user who
    configured `jax_compilation_cache_dir` keeps theirs. Returns the directory in use."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        return Path(current)
    directory = Path(path) if path is not None else cache_dir() / "xla"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile as usual
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def check_tokens(tokens: Sequence[int] | np.ndarray, c: LlamaConfig, what: str = "tokens") -> np.ndarray:
    """Token ids as int32 after checking: 1-D, non-empty, integers in `[0, vocab)`, fits the context."""
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what}: not a sequence of integers") from None
    if arr.ndim != 1:
        raise InvalidInputError(f"{what}: expected one sequence of ids, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise InvalidInputError(f"{what}: empty token list")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{what}: token ids must be integers, got {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= c.vocab_size))
    if bad.size:
        raise InvalidInputError(f"{what}: token id {arr[bad[0]]} at index {bad[0]} is outside [0, {c.vocab_size})")
    if arr.size > c.context_length:
        raise InvalidInputError(f"{what}: {arr.size} tokens exceed the context length {c.context_length}")
    return arr.astype(np.int32)


def pad_rows(rows: Sequence[np.ndarray], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad checked rows into `tokens [B, W]` and `valid [B, W]` (W: the longest row, or `width`)."""
    w = max(len(r) for r in rows) if width is None else width
    tokens = np.zeros((len(rows), w), np.int32)
    valid = np.zeros((len(rows), w), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], valid[i, : len(r)] = r, True
    return tokens, valid


def run_forward(model: Any, tokens: np.ndarray, valid: np.ndarray | None, scan_layers: bool = True) -> np.ndarray:
    """The jitted forward on checked ids `[B, T]`, under the active `trace` recorder if there is one."""
    rec = active_recorder()
    spec = rec.spec_for(model.config) if rec else None
    if rec:
        rec.begin_call(rows=tokens.shape[0])
    rows = tokens.shape[0]
    tokens_d, valid_d = put_rows(getattr(model, "mesh", None), tokens, valid)  # split over "data", padded
    out, captures = forward_capture_jit(
        model.params,
        tokens_d,
        model.config,
        valid_d,
        scan_layers=scan_layers,
        probes=spec,
        act_quant=model.act_quant,
    )
    if rec:
        rec.end_call({k: v[:, :rows] if k in model.config.layer_probes else v[:rows] for k, v in captures.items()})
    out = np.asarray(out[:rows])
    if not np.isfinite(out).all():
        where = "see the recorder's nonfinite()" if rec else "run it under jaxllama.trace() to find where they start"
        warnings.warn(f"logits contain NaN or Inf; {where}", RuntimeWarning, stacklevel=3)
    return out


def logits(model: Any, tokens: Sequence[int] | np.ndarray, scan_layers: bool = True) -> np.ndarray:
    """float32 logits `[T, vocab]` of exactly these token ids (no BOS is added)."""
    ids = check_tokens(tokens, model.config)
    return run_forward(model, ids[None], None, scan_layers)[0]


def logits_batch(model: Any, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Logits for sequences of different lengths in one padded, masked forward call."""
    if len(rows) == 0:
        raise InvalidInputError("rows: empty batch")
    checked = [check_tokens(r, model.config, f"rows[{i}]") for i, r in enumerate(rows)]
    tokens, valid = pad_rows(checked)
    out = run_forward(model, tokens, valid)
    return [out[i, : len(r)] for i, r in enumerate(checked)]
