"""Per-device memory of a model's parameters and KV cache on a mesh, computed from the config and
the sharding table (`rules.py`), for the README's scaling note.

Layouts: "float32", "bfloat16", and the native quantized layouts (`gguf/convert.py`):
"native-q8_0" (one int8 per weight and a float16 scale per 32 values: Q5_0, Q8_0) and
"native-q4_1" (two 4-bit values per byte, a float16 scale and offset per 32 values: Q4_0, Q4_1;
Q4_K files hold float32 ones, 2 bytes more per 32 values, where their scales are not float16 values).
Norms and RoPE factors are float32 in every layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..errors import InvalidInputError, JaxLlamaError
from ..gguf.config import LlamaConfig
from ..gguf.convert import LAYER_MATRICES, tensor_table
from .mesh import check_model_split
from .rules import DEFAULT_VOCAB, spec_for

#: layout -> None (float) or (values per scale, has offsets, 4-bit values packed two per byte)
LAYOUTS = {"float32": None, "bfloat16": None, "native-q8_0": (32, False, False), "native-q4_1": (32, True, True)}
BLOCK = 32


def _config(n_layer: int, d: int, ff: int, h: int, kv: int, vocab: int, ctx: int, tied: bool,
            rope_base: float = 10000.0) -> LlamaConfig:
    return LlamaConfig(n_layer=n_layer, d_model=d, d_ff=ff, n_head=h, n_head_kv=kv, head_dim=d // h,
                       rope_dim=d // h, rope_base=rope_base, rope_scale=1.0, has_rope_freqs=False, rms_eps=1e-5,
                       vocab_size=vocab, context_length=ctx, tied_output=tied)


#: The configs of the README's table (shapes from their GGUF metadata).
CONFIGS = {
    "SmolLM2-135M": _config(30, 576, 1536, 9, 3, 49152, 8192, True, 100000.0),
    "TinyLlama-1.1B": _config(22, 2048, 5632, 32, 4, 32000, 2048, False),
    "Llama-3-70B": _config(80, 8192, 28672, 64, 8, 128256, 8192, False, 500000.0),
}
DEVICES = (1, 8, 64)


class Memory(NamedTuple):
    """Bytes per device: the mesh used (data x model), the parameters, the KV cache per token of a row."""

    data: int
    model: int
    weights: int
    kv_per_token: int


def leaves(c: LlamaConfig, layout: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every parameter leaf of `c` in `layout`: '/'-joined path -> (shape, bytes per element)."""
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout: must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    native = LAYOUTS[layout]
    width = 2 if layout == "bfloat16" else 4
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, (shape, path) in tensor_table(c).items():
        if name.startswith("blk.") and not name.startswith("blk.0."):
            continue
        stacked = path[0] == "layers"
        lead = (c.n_layer,) if stacked else ()
        base = "/".join(path[:-1])
        if path[-1] in ("kernel", "embedding") and (path[1] in LAYER_MATRICES or path[0] in ("output", "token_embd")):
            if native:
                block, offset, packed = native
                base = "/".join(path)  # the arrays of its `Blocks`
                out[f"{base}/q"] = ((*lead, shape[0], shape[1] // 2 if packed else shape[1]), 1)
                out[f"{base}/scale"] = ((*lead, shape[0], shape[1] // block), 2)  # float16
                if offset:
                    out[f"{base}/offset"] = ((*lead, shape[0], shape[1] // block), 2)
            else:  # float kernels are [in, out]; the embedding keeps [V, D]
                dims = shape if path[-1] == "embedding" else shape[::-1]
                out["/".join(path)] = ((*lead, *dims), width)
        else:
            out["/".join(path)] = ((*lead, *shape), 4)
    return out


def model_size(c: LlamaConfig, layout: str, devices: int) -> int:
    """The largest model-axis size that divides `devices` and can split `c` (see `check_model_split`)."""
    block = BLOCK if LAYOUTS.get(layout) else None
    for m in sorted((m for m in range(1, devices + 1) if devices % m == 0), reverse=True):
        try:
            check_model_split(c, m, block)
            return m
        except JaxLlamaError:
            continue
    return 1


def memory_per_device(c: LlamaConfig, layout: str, devices: int, vocab: str = DEFAULT_VOCAB) -> Memory:
    """Per-device bytes of `c` in `layout` over `devices` devices, tensor-parallel as far as the
    heads and FFN allow (`model_size`), the rest of the devices on the data axis."""
    if devices < 1:
        raise InvalidInputError(f"devices must be >= 1, got {devices}")
    m = model_size(c, layout, devices)
    total = 0
    for path, (shape, width) in leaves(c, layout).items():
        spec = spec_for(path, vocab)
        split = [shape[i] // m if i < len(spec) and spec[i] == "model" and shape[i] % m == 0 else shape[i]
                 for i in range(len(shape))]
        total += math.prod(split) * width
    kv = 2 * c.n_layer * (c.n_head_kv // m) * c.head_dim * 4  # float32 keys and values
    return Memory(devices // m, m, total, kv)


def memory_table(configs: dict[str, LlamaConfig] | None = None, devices: tuple[int, ...] = DEVICES) -> str:
    """The README's table (markdown): weights per device in GiB and the mesh, per config and layout."""
    configs = CONFIGS if configs is None else configs
    head = "| model | layout | " + " | ".join(f"{d} device{'s' * (d > 1)}" for d in devices) + " |"
    lines = [head, "|" + "---|" * (2 + len(devices))]
    for name, c in configs.items():
        for layout in LAYOUTS:
            cells = []
            for d in devices:
                mem = memory_per_device(c, layout, d)
                cells.append(f"{mem.weights / 2**30:.3f} GiB ({mem.data}x{mem.model})")
            lines.append(f"| {name} | {layout} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| model | KV cache per device, MiB per 1,024 tokens of one row | " + " | ".join(
        f"{d}" for d in devices) + " |")
    lines.append("|" + "---|" * (2 + len(devices)))
    for name, c in configs.items():
        cells = [f"{memory_per_device(c, 'float32', d).kv_per_token * 1024 / 2**20:.1f}" for d in devices]
        lines.append(f"| {name} | float32 cache | " + " | ".join(cells) + " |")
    return "\n".join(lines)
