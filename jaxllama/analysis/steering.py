"""Contrastive steering vectors from prompt pairs, as llama.cpp's `cvector-generator` builds them.

For each (positive, negative) pair the residual streams of both prompts are captured at every
layer; their difference, position by position, is one sample per position (positions where the
two agree exactly, such as a shared prefix, are dropped, as llama.cpp drops zero rows). Layer N's
direction comes from the stream entering layer N (layer N-1's `l_out`) and is added to layer N's
output, the convention of `cvector-generator` and of repeng, so their files and ours mean the
same thing; layer 0 has none. `mean` is the mean difference, `pca` the first principal direction
of the differences (the top right singular vector, uncentred, as llama.cpp's power iteration finds
it, signed to agree with the mean); both are unit vectors, as llama.cpp writes them, so the
strength alone sets the size of the push.

`positions="all"` pads the shorter prompt of a pair with the token of " " as `cvector-generator`
does and uses every position; `"last"` uses each prompt's last token only (repeng's habit).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ..errors import InvalidInputError
from ..gguf.control_vector import ControlVector
from ..model import forward_capture_jit
from ..tracing.probes import ProbeSpec

METHODS = ("mean", "pca")
POSITIONS = ("all", "last")


def _streams(model: Any, rows: Sequence[np.ndarray]) -> np.ndarray:
    """`l_out` of equal-length rows: `[L, B, T, D]`."""
    tokens = jnp.asarray(np.stack(rows))
    _, caps = forward_capture_jit(model.params, tokens, model.config, probes=ProbeSpec(capture=("l_out",)))
    return np.asarray(caps["l_out"], np.float64)


def pair_differences(model: Any, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
                     positions: str = "all") -> list[np.ndarray]:
    """Per layer N = 1..L-1 (index N-1), the samples `[m, D]`: positive minus negative stream
    entering layer N, one row per position that differs."""
    if len(positive) != len(negative) or not positive:
        raise InvalidInputError(f"steering needs as many positive as negative prompts, at least one: "
                                f"{len(positive)} and {len(negative)}")
    if positions not in POSITIONS:
        raise InvalidInputError(f"positions: must be one of {', '.join(POSITIONS)}, not {positions!r}")
    c = model.config
    if c.n_layer < 2:
        raise InvalidInputError("a control vector needs a model of at least two layers")
    pad = model.tokenizer.encode(" ", add_special=False)[-1:]
    samples: list[list[np.ndarray]] = [[] for _ in range(c.n_layer - 1)]
    for i, (p, n) in enumerate(zip(positive, negative)):
        a, b = model.check_tokens(p, f"positive prompt {i}"), model.check_tokens(n, f"negative prompt {i}")
        if positions == "all":
            t = max(len(a), len(b))
            if len(a) != len(b) and not pad:
                raise InvalidInputError(f"prompt pair {i} differs in length and the vocabulary has no token for ' ' "
                                        "to pad it with: use pairs of equal length or positions='last'")
            a, b = (np.concatenate([r, np.repeat(np.int32(pad), t - len(r))]).astype(np.int32) for r in (a, b))
            h = _streams(model, [a, b])  # [L, 2, T, D]
            diff = h[:, 0] - h[:, 1]
        else:
            diff = (_streams(model, [a])[:, 0, -1] - _streams(model, [b])[:, 0, -1])[:, None]  # [L, 1, D]
        for layer in range(c.n_layer - 1):  # the stream entering layer + 1
            d = diff[layer]
            samples[layer].append(d[np.any(d != 0, axis=-1)])
    return [np.concatenate(s) for s in samples]


def steering_vector(model: Any, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
                    method: str = "mean", positions: str = "all") -> ControlVector:
    """A unit direction per layer 1..L-1 from prompt pairs (token ids), as a `ControlVector`
    (`write_control_vector` makes it a llama.cpp file; `Model.with_control_vector(cv.scaled(s))`
    applies it)."""
    if method not in METHODS:
        raise InvalidInputError(f"method: must be one of {', '.join(METHODS)}, not {method!r}")
    return directions(model, pair_differences(model, positive, negative, positions), method)


def directions(model: Any, samples: Sequence[np.ndarray], method: str = "mean") -> ControlVector:
    """The unit direction of each layer's samples (`pair_differences`), by `method`."""
    if method not in METHODS:
        raise InvalidInputError(f"method: must be one of {', '.join(METHODS)}, not {method!r}")
    c = model.config
    out = np.zeros((c.n_layer, c.d_model), np.float32)
    for layer, d in enumerate(samples, start=1):
        if len(d) == 0:
            continue  # the pairs agree exactly here: no direction
        mean = d.mean(axis=0)
        if method == "mean":
            v = mean
        else:
            v = np.linalg.svd(d, full_matrices=False)[2][0]
            v = v if v @ mean >= 0 else -v
        norm = np.linalg.norm(v)
        out[layer] = v / norm if norm > 0 else 0.0
    return ControlVector(out, c.arch)
