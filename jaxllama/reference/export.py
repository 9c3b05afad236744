"""Write an F32 copy of a GGUF: every tensor dequantized by `gguf.quants` (independent of
jaxllama's own dequantizer). With an F32 KV cache and flash attention off, llama.cpp then
computes in float32 like jaxllama, so logits can be compared bit-close.

`requantize` writes a re-quantized copy instead (matrices to Q8_0, Q4_0, ...: the types
`gguf.quants` can quantize), the other side of a "how much does this quantization cost" KL run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np


def _rewrite(src: str | os.PathLike, dst: str | os.PathLike, file_type: int,
             convert: Callable[[str, np.ndarray], tuple[np.ndarray, object]]) -> Path:
    """Copy GGUF `src` to `dst` (metadata unchanged but file_type), each tensor through
    `convert(name, float32 values) -> (data, raw_dtype or None)`."""
    import gguf

    from ..quant.file import copy_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    tmp = Path(f"{dst}.partial-{os.getpid()}")  # several processes may make the same cached file
    writer = gguf.GGUFWriter(tmp, arch)
    copy_metadata(reader, writer, replace={"general.file_type": int(file_type)})
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data, raw = convert(t.name, values.reshape(tuple(int(d) for d in reversed(t.shape))))
        writer.add_tensor(t.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return Path(dst)


def export_f32(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a copy of GGUF `src` with all tensors as float32 (metadata unchanged but file_type)."""
    import gguf

    return _rewrite(src, dst, gguf.LlamaFileType.ALL_F32, lambda name, v: (v, None))


def requantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "Q8_0") -> Path:
    """Write a copy of GGUF `src` whose matrices (2-D tensors) are re-quantized to `qtype`
    (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16: what `gguf.quants` quantizes) from their dequantized
    values; vectors (norms) stay F32."""
    import gguf

    from ..errors import InvalidInputError

    T = gguf.GGMLQuantizationType
    kinds = {"Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "BF16": T.BF16}
    if qtype not in kinds:
        raise InvalidInputError(f"requantize: type must be one of {', '.join(kinds)}, got {qtype!r}")
    q = kinds[qtype]
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")

    def convert(name: str, v: np.ndarray) -> tuple[np.ndarray, object]:
        if v.ndim != 2 or v.shape[-1] % gguf.GGML_QUANT_SIZES[q][0]:
            return v, None
        return gguf.quants.quantize(v, q), q

    return _rewrite(src, dst, file_type, convert)


def export_offgrid(src: str | os.PathLike, dst: str | os.PathLike, noise: float = 0.05, seed: int = 0) -> Path:
    """An F32 copy of `src` with seeded noise of `noise` x each matrix's std added to every tensor
    llama-quantize would quantize (norms untouched): a base off every quantization grid, where
    re-quantizing to the file's own type is no longer lossless (see tools/offgrid_base.py)."""
    import gguf

    from ..quant.file import allows_quantization

    rng = np.random.default_rng(seed)

    def convert(name: str, v: np.ndarray) -> tuple[np.ndarray, object]:
        if allows_quantization(name, v.ndim):
            v = v + (np.float32(noise) * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
        return v.astype(np.float32), None

    return _rewrite(src, dst, gguf.LlamaFileType.ALL_F32, convert)
