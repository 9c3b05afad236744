"""Reading XLA's compiled HLO text: which buffers exist outside fusions."""

from __future__ import annotations

import re


def unfused(text: str) -> str:
    """The compiled HLO without the bodies of fusions: what is left are real buffers.

    A shape that appears only inside a fusion body (e.g. the dequantized matrix of a fused
    matrix-vector product) is never written to memory.
    """
    bodies = set(re.findall(r"fusion\([^\n]*calls=%([\w.\-]+)", text))
    computations = re.split(r"\n(?=%?[\w.\-]+ \(|ENTRY )", text)
    return "\n".join(c for c in computations if c.strip().split(" ", 1)[0].lstrip("%") not in bodies)
