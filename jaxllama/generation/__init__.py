"""Sampling and text generation on device.

    sampling.py  Sampler (frozen settings) and the pure sampling chain, in llama.cpp's order
    loop.py      prefill into a KV cache, then an on-device `lax.while_loop` (generate) or a
                 Python-driven loop over the same step (stream)
"""

from .loop import Generation, generate, stream
from .sampling import Sampler, sample

__all__ = ["Generation", "Sampler", "generate", "sample", "stream"]
