"""Importance matrices as llama.cpp computes, writes and reads them (`tools/imatrix`,
`common/imatrix-loader.cpp`, `tools/quantize`).

For every matrix product `W x` of the layers (and `output.weight` with `process_output`), the
sum over tokens of each input column squared, `in_sum2`, and the number of tokens, `counts`.
llama-quantize weighs each column's rounding error by `in_sum2 / counts`. `compute_imatrix`
collects these from jitted forwards over chunks of the text (the first token of each chunk
replaced by BOS, as llama-imatrix does); the files are the GGUF format (`general.type =
imatrix`, tensors `NAME.in_sum2 [n_mat, n]` and `NAME.counts [n_mat, 1]`) or the legacy `.dat`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ..errors import InvalidInputError

# the probe whose values are the input of each matrix (llama.cpp's graph: `build_norm` output
# into q/k/v, the merged heads into attn_output, the FFN norm into gate/up, the gated product into down)
MATRIX_INPUTS = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "kqv_out": ("attn_output",),
                 "ffn_norm": ("ffn_gate", "ffn_up"), "ffn_swiglu": ("ffn_down",), "ffn_geglu": ("ffn_down",)}


@dataclass
class Imatrix:
    """`sums[name]`: float64 `[n_mat, n]` sums of squared inputs; `counts[name]`: `[n_mat]` tokens."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def weights(self) -> dict[str, np.ndarray]:
        """Per tensor, what llama-quantize hands its quantizers: in_sum2 / counts in float32 (a
        legacy file holds the means times ncall, divided back)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float32)
            s32 = s.astype(np.float32)
            if self.legacy:
                out[name] = (s32 / c[0] if c[0] > 0 else s32).reshape(-1)
            else:
                out[name] = np.where(c[:, None] > 0, s32 / np.where(c > 0, c, 1)[:, None], np.float32(1)).reshape(-1)
        return out

    def check_for(self, shapes: dict[str, int]) -> None:
        """Every entry names a matrix of the model with as many input columns (else bad input)."""
        for name, s in self.sums.items():
            if name not in shapes:
                raise InvalidInputError(f"imatrix: entry {name} is not a matrix of this model (an imatrix for another model?)")
            if s.shape[-1] != shapes[name]:
                raise InvalidInputError(f"imatrix: {name} has {s.shape[-1]} columns, the model's matrix {shapes[name]} "
                                        "(an imatrix for another model?)")


def write_imatrix(path: str | os.PathLike, im: Imatrix) -> Path:
    """llama-imatrix's GGUF output (float32 sums and counts)."""
    import gguf

    from .file import partial_file

    path = Path(path)
    w = gguf.GGUFWriter(path, "imatrix")
    # llama-imatrix writes no architecture key: drop the one GGUFWriter adds
    w.kv_data[0].pop("general.architecture", None)
    w.add_string("general.type", "imatrix")
    # llama-quantize refuses a file without this key, and gguf-py cannot write an empty array
    w.add_array("imatrix.datasets", list(im.datasets) or ["unknown"])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(im.sums[name], np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(im.counts[name], np.float32).reshape(-1, 1))
    with partial_file(path) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """An imatrix file, GGUF or legacy `.dat` (decided as llama.cpp does: GGUF if it parses as one)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"imatrix: {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as e:
        raise InvalidInputError(f"imatrix: {path}: not a readable GGUF file ({e})") from None
    get = lambda k: r.get_field(k).contents() if r.get_field(k) is not None else None  # noqa: E731
    if get("imatrix.chunk_count") is None or get("imatrix.chunk_size") is None or get("imatrix.datasets") is None:
        raise InvalidInputError(f"imatrix: {path}: missing imatrix metadata (imatrix.datasets, chunk_count, chunk_size)")
    im = Imatrix(datasets=list(get("imatrix.datasets")), chunk_count=int(get("imatrix.chunk_count")),
                 chunk_size=int(get("imatrix.chunk_size")))
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        c = tensors.get(name + ".counts")
        if c is None or t.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InvalidInputError(f"imatrix: {path}: {name} needs F32 .in_sum2 and .counts tensors")
        counts = np.rint(np.asarray(c.data, np.float64).reshape(-1))
        im.counts[name] = counts
        im.sums[name] = np.asarray(t.data, np.float64).reshape(len(counts), -1)
    if not im.sums:
        raise InvalidInputError(f"imatrix: {path}: no .in_sum2 tensors")
    return im


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    im = Imatrix(legacy=True)
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InvalidInputError(f"imatrix: {path}: truncated legacy imatrix file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1:
        raise InvalidInputError(f"imatrix: {path}: neither GGUF nor a legacy imatrix file (no entries)")
    for _ in range(n):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise InvalidInputError(f"imatrix: {path}: neither GGUF nor a legacy imatrix file")
        (raw,) = take(f"<{length}s")
        ncall, nval = take("<ii")
        if nval < 1:
            raise InvalidInputError(f"imatrix: {path}: entry {raw!r} has no values")
        values = np.array(take(f"<{nval}f"), np.float64)
        name = raw.decode("utf-8", "replace")
        im.sums[name] = values[None]
        im.counts[name] = np.array([ncall], np.float64)
    if pos < len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                im.datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return im


def matrix_columns(model: Any) -> dict[str, int]:
    """Input columns of every matrix an imatrix may name: `blk.N.attn_q.weight` -> d_model, ..."""
    from ..gguf.reader import read_gguf

    return {t.name: int(t.shape[-1]) for t in read_gguf(model.source).tensors.values() if len(t.shape) == 2}


def chunks_of(tokens: Sequence[int], n_ctx: int, bos: int | None, limit: int | None = None) -> np.ndarray:
    """llama-imatrix's chunks: consecutive `n_ctx` tokens (the rest dropped), each starting with BOS
    when the vocabulary adds one."""
    n = len(tokens) // n_ctx if limit is None else min(limit, len(tokens) // n_ctx)
    if n < 1:
        raise InvalidInputError(f"imatrix: the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    out = np.asarray(tokens[: n * n_ctx], np.int32).reshape(n, n_ctx).copy()
    if bos is not None:
        out[:, 0] = bos
    return out


@partial(jax.jit, static_argnames=("config", "probes", "act_quant"))
def _square_sums(params: Any, tokens: Any, config: Any, probes: tuple[str, ...], act_quant: Any) -> dict:
    import jax.numpy as jnp

    from ..model import forward_capture
    from ..tracing.probes import ProbeSpec

    _, cap = forward_capture(params, tokens, config, probes=ProbeSpec(capture=probes), act_quant=act_quant)
    # layer probes [L, B, T, X] -> [L, X]; global ones [B, T, X] -> [X]
    return {k: jnp.sum(jnp.square(v.reshape(*v.shape[: v.ndim - 3], -1, v.shape[-1])), axis=-2) for k, v in cap.items()}


def compute_imatrix(model: Any, chunks: np.ndarray, batch: int = 1, process_output: bool = False,
                    dataset: str = "", progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """The importance matrix of `model` over token chunks `[n_chunks, n_ctx]`, `batch` chunks per
    jitted forward (each chunk its own sequence, as llama-imatrix's parallel sequences)."""
    import jax.numpy as jnp

    c = model.config
    probes = tuple(p for p in MATRIX_INPUTS if p in c.probe_order)
    tensors = set(matrix_columns(model))
    if process_output and "output.weight" in tensors:
        probes += ("result_norm",)
    acc: dict[str, np.ndarray] = {}
    n = len(chunks)
    for i in range(0, n, batch):  # a short last batch runs as it is (one more compilation)
        sums = _square_sums(model.params, jnp.asarray(chunks[i:i + batch]), c, probes, model.act_quant)
        for k, v in sums.items():
            v = np.asarray(v, np.float64)
            acc[k] = v if k not in acc else acc[k] + v
        if progress:
            progress(min(i + batch, n), n)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_count=n, chunk_size=int(chunks.shape[1]))
    tokens = float(chunks.size)
    for probe, v in acc.items():
        if probe == "result_norm":
            im.sums["output.weight"], im.counts["output.weight"] = v[None], np.array([tokens])
            continue
        for layer in range(c.n_layer):
            for m in MATRIX_INPUTS[probe]:
                name = f"blk.{layer}.{m}.weight"
                if name in tensors:
                    im.sums[name], im.counts[name] = v[layer][None], np.array([tokens])
    return im
