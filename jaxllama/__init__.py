"""jaxllama: run and inspect Llama-family GGUF models in JAX, checked against llama.cpp.

    import jaxllama
    model = jaxllama.load()                 # default SmolLM2-135M-Instruct Q4_1
    logits = model.logits([1, 2, 3])        # float32 [T, vocab]
    jaxllama.forward(model.params, tokens, model.config)   # the pure, jit-able forward
"""

from .comparison import Comparison, compare
from .config import LlamaConfig
from .dequant import dequantize
from .errors import (
    GGUFFormatError,
    InvalidInputError,
    JaxLlamaError,
    ModelDownloadError,
    UnsupportedModelError,
)
from .gguf_file import GGUFFile, TensorInfo, read_gguf
from .loader import Model, load
from .model import forward, forward_capture, forward_jit
from .params import params_from_gguf
from .chat_template import ChatTemplateError
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from .probes import GLOBAL_PROBES, LAYER_PROBES, Intervention, ProbeSpec
from .recorder import Recorder, trace
from . import interventions

__version__ = "0.1.0"


__all__ = [
    "GGUFFile",
    "GGUFFormatError",
    "InvalidInputError",
    "JaxLlamaError",
    "LlamaConfig",
    "Model",
    "ModelDownloadError",
    "TensorInfo",
    "UnsupportedModelError",
    "dequantize",
    "forward",
    "forward_jit",
    "forward_capture",
    "trace",
    "Recorder",
    "ProbeSpec",
    "Intervention",
    "LAYER_PROBES",
    "GLOBAL_PROBES",
    "interventions",
    "compare",
    "Comparison",
    "load",
    "params_from_gguf",
    "read_gguf",
    "ChatTemplateError",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
]
