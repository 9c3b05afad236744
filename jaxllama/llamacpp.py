"""llama.cpp (through llama-cpp-python) as the numerical reference.

`export_f32` rewrites a GGUF with every tensor dequantized to float32 by `gguf.quants`
(independent of jaxllama's own dequantizer); with an F32 KV cache and flash attention off,
llama.cpp then computes in float32 like jaxllama, so logits can be compared bit-close.
On a quantized file llama.cpp quantizes activations too (Q8_1 for Q4_1 weights), so only
agreement in distribution is expected there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import JaxLlamaError


class ReferenceUnavailableError(JaxLlamaError):
    """llama.cpp cannot serve as the reference: llama-cpp-python missing (it comes with the
    `dev` extra), or it failed to load the file."""


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise ReferenceUnavailableError(
            f"llama-cpp-python is not importable ({e}); install jaxllama with the dev extra"
        ) from None
    return llama_cpp


def export_f32(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a copy of GGUF `src` with all tensors as float32 (metadata unchanged but file_type)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    tmp = Path(f"{dst}.partial")
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape(tuple(int(d) for d in reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return Path(dst)


class LlamaCpp:
    """A llama.cpp context that returns logits for every position of a token sequence.

    Defaults are the bit-close settings: float32 KV cache, flash attention off.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None):
        llama_cpp = _llama_cpp()
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=n_threads or os.cpu_count(),
            n_threads_batch=n_threads or os.cpu_count(),
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32
            type_v=0,
            flash_attn=False,
            verbose=False,
        )

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 `[T, vocab]` logits of `tokens` from an empty cache."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise ValueError(f"need 1..{self.n_ctx} tokens, got {len(tokens)}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
        """llama.cpp's greedy continuation: argmax of its logits, one cached decode step per token."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if tok in stop:
                break
            self.llm.eval([tok])
        return out

    def close(self) -> None:
        self.llm.close()
