"""From a sensitivity sweep to a file: one type per group under a size budget.

The budget is in bits per weight as llama-quantize reports them (tensor data bytes * 8 / number
of weights, every tensor counted). The choice is a multiple-choice knapsack over the sweep's
measured KL (summed over groups: the sweep measures each group alone, and small independent
perturbations add to first order), solved exactly by dynamic programming on bytes rounded up to
1/4096 of the budget (so a solution found always fits).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InvalidInputError

_BPW = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:bpw)?\s*$", re.IGNORECASE)


def parse_budget(text: str) -> float:
    """'4.8' or '4.8bpw' -> 4.8 bits per weight."""
    m = _BPW.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise InvalidInputError(f"--budget {text!r}: expected bits per weight such as 4.8 or 4.8bpw")
    return float(m.group(1))


def choose(options: Mapping[str, Sequence[tuple[str, int, float]]], capacity: int, units: int = 4096) -> dict[str, str]:
    """Group -> type minimising the summed KL with summed bytes <= capacity. `options[group]` lists
    (type, bytes, kl). Raises InvalidInputError when even the smallest choices do not fit."""
    groups = list(options)
    smallest = sum(min(b for _, b, _ in options[g]) for g in groups)
    if smallest > capacity:
        raise InvalidInputError(f"no mix fits ({smallest} bytes at the smallest types, {capacity} allowed)")
    unit = max(1, -(-capacity // units))
    cap = capacity // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    pick = np.zeros((len(groups), cap + 1), np.int16)
    for gi, g in enumerate(groups):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, np.int16)
        for k, (_, nbytes, kl) in enumerate(options[g]):
            w = -(-nbytes // unit)  # rounded up: the true total never exceeds the capacity
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + kl
            better = cand < new
            new[better], arg[better] = cand[better], k
        best, pick[gi] = new, arg
    if not np.isfinite(best).any():
        raise InvalidInputError("no mix fits once sizes are rounded to the budget's resolution")
    at = int(np.argmin(best))
    out: dict[str, str] = {}
    for gi in range(len(groups) - 1, -1, -1):
        k = int(pick[gi, at])
        t, nbytes, _ = options[groups[gi]][k]
        out[groups[gi]] = t
        at -= -(-nbytes // unit)
    return out


def options_from_sweep(sweep: Mapping[str, Any]) -> dict[str, list[tuple[str, int, float]]]:
    """(type, bytes, mean KL) per group, from `Sensitivity.to_json()`."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for c in sweep["cells"]:
        out.setdefault(c["group"], []).append((c["type"], int(c["bytes"]), float(c["kld_mean"])))
    return out
