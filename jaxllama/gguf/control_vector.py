"""llama.cpp control vectors: GGUF files of per-layer directions added to the residual stream.

The format (`cvector-generator`, read by `common_control_vector_load`): architecture
`controlvector`, keys `controlvector.model_hint` (the model's architecture) and
`controlvector.layer_count`, and one F32 1-D tensor `direction.N` of the model's width per layer
N >= 1 (layer 0 never has one). llama.cpp adds `strength * direction.N` to layer N's output (the
residual stream after the FFN add, what the `l_out` probe shows), for N in a layer range that
defaults to every layer; several files are summed with their strengths (`--control-vector-scaled`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GGUFFormatError, InvalidInputError

ARCH = "controlvector"
_NAME = re.compile(r"direction\.(\d+)")


@dataclass(frozen=True)
class ControlVector:
    """`directions [n_layer, D]` float32: row N is added to layer N's output (row 0 is always
    zero: llama.cpp has no direction for layer 0). `model_hint`: the architecture it was made for."""

    directions: np.ndarray
    model_hint: str = ""
    #: where it came from, for the `reproduce` block: files (path, SHA-256) and strengths
    sources: tuple[dict, ...] = ()

    def scaled(self, strength: float) -> "ControlVector":
        """`strength` times this vector (llama.cpp multiplies each file by its scale)."""
        if not np.isfinite(strength):
            raise InvalidInputError(f"control vector strength: must be finite, not {strength}")
        sources = tuple({**src, "strength": src.get("strength", 1.0) * float(strength)} for src in self.sources)
        return ControlVector((self.directions * np.float32(strength)).astype(np.float32), self.model_hint, sources)

    @property
    def width(self) -> int:
        return int(self.directions.shape[1])


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """A control-vector GGUF, checked as llama.cpp checks it (names `direction.N`, N >= 1, F32, 1-D,
    one width). Raises `GGUFFormatError` naming the file and the fault."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF control vector ({e})") from None
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != ARCH:
        got = None if arch is None else arch.contents()
        raise GGUFFormatError(f"{path}: general.architecture is {got!r}, not {ARCH!r}: not a control vector")
    hint = reader.get_field(f"{ARCH}.model_hint")
    rows: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = _NAME.fullmatch(t.name)
        if m is None or int(m.group(1)) == 0:
            raise GGUFFormatError(f"{path}: tensor {t.name!r} is not direction.N with N >= 1")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise GGUFFormatError(f"{path}: tensor {t.name!r} must be a 1-D F32 vector")
        rows[int(m.group(1))] = np.asarray(t.data, np.float32)
    if not rows:
        raise GGUFFormatError(f"{path}: no direction.N tensors")
    widths = {len(v) for v in rows.values()}
    if len(widths) > 1:
        raise GGUFFormatError(f"{path}: direction tensors of different widths {sorted(widths)}")
    out = np.zeros((max(rows) + 1, widths.pop()), np.float32)
    for n, v in rows.items():
        out[n] += v
    if not np.isfinite(out).all():
        raise GGUFFormatError(f"{path}: direction tensors hold NaN or Inf")
    from .default_model import sha256_file

    return ControlVector(out, "" if hint is None else str(hint.contents()),
                         ({"file": str(path), "sha256": sha256_file(path)},))


def write_control_vector(path: str | os.PathLike, cv: ControlVector) -> Path:
    """Write `cv` as llama.cpp's `cvector-generator` does: `direction.1` .. `direction.{L-1}`."""
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_string(f"{ARCH}.model_hint", cv.model_hint)
    w.add_int32(f"{ARCH}.layer_count", cv.directions.shape[0] - 1)
    for n in range(1, cv.directions.shape[0]):
        w.add_tensor(f"direction.{n}", np.ascontiguousarray(cv.directions[n], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def combine(vectors: Sequence[tuple[ControlVector, float]]) -> ControlVector:
    """Several control vectors summed with their strengths, as llama.cpp sums `--control-vector-scaled`
    files (the shorter ones padded with zero layers)."""
    if not vectors:
        raise InvalidInputError("no control vectors to combine")
    widths = {cv.width for cv, _ in vectors}
    if len(widths) > 1:
        raise InvalidInputError(f"control vectors of different widths {sorted(widths)} cannot be combined")
    out = np.zeros((max(cv.directions.shape[0] for cv, _ in vectors), widths.pop()), np.float32)
    sources: tuple[dict, ...] = ()
    for cv, strength in vectors:
        scaled = cv.scaled(strength)
        out[: cv.directions.shape[0]] += scaled.directions
        sources += scaled.sources
    return ControlVector(out, vectors[0][0].model_hint, sources)


def layer_mask(n_layer: int, layer_range: tuple[int, int] | None) -> np.ndarray:
    """`[n_layer]` True where llama.cpp applies a control vector: layers `start..end` inclusive
    (default 1..n_layer, llama.cpp's own default), never layer 0."""
    start, end = layer_range if layer_range is not None else (1, n_layer)
    if not (0 <= start <= end <= n_layer):
        raise InvalidInputError(f"control vector layer range {start} {end}: must satisfy 0 <= start <= end <= "
                                f"{n_layer} (the model has {n_layer} layers)")
    layers = np.arange(n_layer)
    return (layers >= max(start, 1)) & (layers <= end)


def for_model(cv: ControlVector, n_layer: int, d_model: int, arch: str,
              layer_range: tuple[int, int] | None = None) -> np.ndarray:
    """The `[n_layer, D]` float32 additions to each layer's output for a model, checked: its
    width, its architecture (the file's hint, when it has one) and no direction past its last layer."""
    if cv.width != d_model:
        raise InvalidInputError(f"control vector of width {cv.width} does not fit a model of width {d_model}")
    if cv.model_hint and cv.model_hint != arch:
        raise InvalidInputError(f"control vector made for architecture {cv.model_hint!r}, not {arch!r}")
    rows = cv.directions.shape[0]
    if rows > n_layer and np.any(cv.directions[n_layer:]):
        last = int(np.flatnonzero(np.any(cv.directions != 0, axis=1)).max())
        raise InvalidInputError(f"control vector has direction.{last}, past the model's last layer {n_layer - 1}")
    out = np.zeros((n_layer, d_model), np.float32)
    out[: min(rows, n_layer)] = cv.directions[:n_layer]
    return out * layer_mask(n_layer, layer_range)[:, None]
