"""llama.cpp as the numerical reference, through llama-cpp-python (the `jaxllama[llamacpp]` extra).

Nothing here is needed to run a model; it is how jaxllama checks itself and how users compare.

    binding.py   import llama-cpp-python with a clear error, and a crash check in a child process
    llamacpp.py  one llama.cpp context: tokenize, logits, greedy decoding, batched sequences
    capture.py   llama.cpp's intermediate tensors through its eval callback
    compare.py   jaxllama vs llama.cpp, probe by probe: where do they part?
    export.py    an F32 re-export of a GGUF (gguf.quants), for bit-close comparison; re-quantized copies
"""

from .binding import ReferenceCrashError, ReferenceUnavailableError, check_reference, load_llama_cpp
from .capture import capture
from .compare import Comparison, ProbeDiff, compare
from .export import export_f32, requantize
from .llamacpp import LlamaCpp

__all__ = ["Comparison", "LlamaCpp", "ProbeDiff", "ReferenceCrashError", "ReferenceUnavailableError",
           "capture", "check_reference", "compare", "export_f32", "load_llama_cpp", "requantize"]
