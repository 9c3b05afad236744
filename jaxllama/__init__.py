"""jaxllama: run and inspect Llama-family GGUF models in JAX, checked against llama.cpp.

    import jaxllama
    model = jaxllama.load()                 # default SmolLM2-135M-Instruct Q4_1
    logits = model.logits([1, 2, 3])        # float32 [T, vocab]
    jaxllama.forward(model.params, tokens, model.config)   # the pure, jit-able forward

The package follows the data path: `gguf` (file -> parameters), `model` (the pure forward),
`tracing` (probes, statistics, interventions), `text` (tokenizer, chat templates), `generation`
(samplers, decode loop), `scoring` (log-likelihoods, perplexity, KL divergence), `reference`
(llama.cpp, an optional extra) and `cli`.
"""

import sys

from .errors import (
    GGUFFormatError,
    InvalidInputError,
    JaxLlamaError,
    ModelDownloadError,
    UnsupportedModelError,
)
from .generation import Generation, Sampler, generate, stream
from .gguf import GGUFFile, LlamaConfig, TensorInfo, dequantize, params_from_gguf, read_gguf
from .loader import Model, load
from .model import forward, forward_capture, forward_jit
from .runner import use_compilation_cache
from .reference import Comparison, ReferenceUnavailableError, compare
from .scoring import (
    KLDivergence,
    Perplexity,
    TokenLogprobs,
    kl_divergence,
    loglikelihood,
    loglikelihood_rolling,
    perplexity,
    token_logprobs,
)
from .text import ChatTemplateError, StreamDecoder, Tokenizer, load_tokenizer
from .tracing import GLOBAL_PROBES, LAYER_PROBES, Intervention, ProbeSpec, Recorder, interventions, trace

__version__ = "0.1.0"

# Stable public module paths, wherever the code lives: `from jaxllama.interventions import zero`,
# `from jaxllama.sampling import Sampler`.
from .generation import sampling  # noqa: E402
sys.modules[f"{__name__}.interventions"] = interventions
sys.modules[f"{__name__}.sampling"] = sampling

__all__ = [
    "ChatTemplateError",
    "Comparison",
    "GGUFFile",
    "GGUFFormatError",
    "GLOBAL_PROBES",
    "Generation",
    "Intervention",
    "InvalidInputError",
    "JaxLlamaError",
    "KLDivergence",
    "LAYER_PROBES",
    "LlamaConfig",
    "Model",
    "ModelDownloadError",
    "Perplexity",
    "ProbeSpec",
    "Recorder",
    "ReferenceUnavailableError",
    "Sampler",
    "StreamDecoder",
    "TensorInfo",
    "TokenLogprobs",
    "Tokenizer",
    "UnsupportedModelError",
    "compare",
    "dequantize",
    "forward",
    "forward_capture",
    "forward_jit",
    "generate",
    "interventions",
    "kl_divergence",
    "load",
    "load_tokenizer",
    "loglikelihood",
    "loglikelihood_rolling",
    "params_from_gguf",
    "perplexity",
    "read_gguf",
    "sampling",
    "stream",
    "token_logprobs",
    "trace",
    "use_compilation_cache",
]
