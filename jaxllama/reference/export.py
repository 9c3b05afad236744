"""Write an F32 copy of a GGUF: every tensor dequantized by `gguf.quants` (independent of
jaxllama's own dequantizer). With an F32 KV cache and flash attention off, llama.cpp then
computes in float32 like jaxllama, so logits can be compared bit-close."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
