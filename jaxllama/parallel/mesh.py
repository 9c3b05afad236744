"""The `("data", "model")` device mesh: build it from the visible devices, parse `"DATAxMODEL"`,
and check that a model can be split over it.

"data" splits batches (rows of scoring, logits_batch and generation); "model" splits the layer
matrices Megatron-style (see `rules.py`). A mesh is only valid for a config whose KV heads and
feed-forward width the model size divides, and, for native (quantized) weights split along their
input width, whose per-shard input width is a whole number of quantization blocks.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from ..errors import InvalidInputError
from ..gguf.config import LlamaConfig

AXES = ("data", "model")


def parse_mesh(text: str) -> tuple[int, int]:
    """`"2x2"` -> (2, 2): the data and model sizes, or a one-line `InvalidInputError`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise InvalidInputError(f"--mesh: expected DATAxMODEL with positive integers (e.g. 2x2), not {text!r}")
    return int(m.group(1)), int(m.group(2))


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `("data", "model")` mesh over `devices` (default: this process's local devices).

    `data=-1` takes every device not used by the model axis. Raises `InvalidInputError` when the
    sizes do not match the number of devices.
    """
    devs = list(jax.local_devices() if devices is None else devices)
    if model < 1 or (data != -1 and data < 1):
        raise InvalidInputError(f"mesh: sizes must be >= 1, got data={data}, model={model}")
    if data == -1:
        if len(devs) % model:
            raise InvalidInputError(f"mesh: model size {model} does not divide the {len(devs)} devices")
        data = len(devs) // model
    if data * model > len(devs):
        raise InvalidInputError(f"mesh: {data}x{model} needs {data * model} devices, only {len(devs)} are visible "
                                f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)")
    return Mesh(np.array(devs[: data * model]).reshape(data, model), AXES)


def mesh_sizes(mesh: Mesh | None) -> tuple[int, int]:
    """(data, model) sizes of a mesh; (1, 1) for None."""
    if mesh is None:
        return 1, 1
    if tuple(mesh.axis_names) != AXES:
        raise InvalidInputError(f"mesh: axes must be {AXES}, not {tuple(mesh.axis_names)}")
    return int(mesh.shape["data"]), int(mesh.shape["model"])


def check_model_split(c: LlamaConfig, model: int, block: int | None = None) -> None:
    """Refuse a model-axis size that cannot split this config (numbers in the message).

    `block`: the quantization block (values per scale) of native weights split along their input
    width; each shard's input width must be a multiple of it.
    """
    if model == 1:
        return
    if c.n_head_kv % model:
        raise InvalidInputError(f"mesh: model size {model} does not divide the {c.n_head_kv} KV heads")
    if c.d_ff % model:
        raise InvalidInputError(f"mesh: model size {model} does not divide the feed-forward width {c.d_ff}")
    if block:
        for name, width in (("attn_output", c.n_head * c.head_dim), ("ffn_down", c.d_ff)):
            if (width // model) % block:
                raise InvalidInputError(f"mesh: model size {model} splits {name}'s input width {width} into "
                                        f"{width // model}, not a multiple of its quantization block {block}")


def native_block(params: dict) -> int | None:
    """The quantization block of the native row-split matrices (attn_output, ffn_down), or None."""
    layers = params["params"]["layers"]
    from ..gguf.blocks import Blocks

    def block(w: Blocks) -> int:
        # its group; a packed q splits in whole units of 32 values (16 bytes); K-quants' factors per 256
        by = [w.group, 32 if w.packed else 0]
        if w.scale_d is not None:
            by.append(w.width // w.scale_d.shape[-1])
        return max(by)

    kernels = [layers[n]["kernel"] for n in ("attn_output", "ffn_down") if n in layers]
    blocks = [block(w) for w in kernels if isinstance(w, Blocks)]
    return max(blocks) if blocks else None
