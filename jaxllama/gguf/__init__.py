"""From a GGUF file to a parameter pytree: the header reader, dequantization, the config, the
conversion, saved parameter files and the default model.

    reader.py         strict GGUF header reader; tensor data stays memory-mapped
    dequant.py        GGML block formats -> float32 in JAX, bit for bit equal to gguf.quants
    config.py         LlamaConfig, the frozen hyper-parameters read from the metadata
    convert.py        GGUF tensors -> the Flax pytree (layout documented there)
    saved.py          save a converted pytree to msgpack, load it back
    converted.py      conversions kept in the jaxllama cache, read back by later loads
    default_model.py  known models (the default SmolLM2-135M, qwen2.5-0.5b, gemma3-270m): fetch, hash-check
"""

from .config import LlamaConfig
from .convert import Params, params_from_gguf
from .dequant import dequantize
from .reader import GGUFFile, TensorInfo, read_gguf

__all__ = ["GGUFFile", "LlamaConfig", "Params", "TensorInfo", "dequantize", "params_from_gguf", "read_gguf"]
