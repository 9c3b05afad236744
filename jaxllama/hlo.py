"""Reading XLA's compiled HLO text: which buffers exist outside fusions, which kernels were chosen."""

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


def kernel_counts(text: str) -> dict[str, int]:
    """How often each kind of matrix kernel occurs in compiled HLO `text` (a loop body counts once):
    GPU Triton GEMM fusions (which can hold a dequantization), cuBLAS calls (on operands built
    in memory), and jaxllama's CPU kernels."""
    from .kernels import ATTEND_TARGET, DEQUANT_TARGET, TARGET

    markers = {"triton_gemm": "__triton_gemm", "cublas": 'custom_call_target="__cublas',
               "jaxllama_gemv": f'custom_call_target="{TARGET}"', "jaxllama_attend": f'custom_call_target="{ATTEND_TARGET}"',
               "jaxllama_dequant": f'custom_call_target="{DEQUANT_TARGET}"'}
    return {name: text.count(marker) for name, marker in markers.items()}
