"""Whole-file quantization as `llama-quantize` does it (`src/llama-quant.cpp`), written with gguf-py.

The tensors keep llama.cpp's order (global tensors, then each layer, by name), its choice of which
tensors to quantize (matrices named `*.weight`, not norms), its per-tensor fallbacks for rows
that do not fill a 256-value super-block (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K
-> Q8_0), `general.file_type` and `general.quantization_version`; every other metadata key is
copied. Tensors are quantized and written one at a time (the file is read memory-mapped), into
`OUT.partial`, renamed on success: a failure leaves no output file behind.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

from ..errors import InvalidInputError
from . import parse_type, quantize

T = GGMLQuantizationType
# the ftype llama-quantize writes for each type name ("Q4_K" is its alias for Q4_K_M)
FILE_TYPES = {"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q2_K": LlamaFileType.MOSTLY_Q2_K,
              "Q3_K": LlamaFileType.MOSTLY_Q3_K_M, "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
              "Q5_K": LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": LlamaFileType.MOSTLY_Q6_K,
              "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL}
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight",
                  "altup", "laurel", "per_layer_model_proj")


@contextmanager
def partial_file(path: Path) -> Iterator[Path]:
    """Write to `PATH.partial`, renamed to `path` when the block ends; removed on any failure, so
    no half-written output is ever left under either name."""
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, replace: Mapping[str, object] | None = None,
                  drop: tuple[str, ...] = ()) -> None:
    """Every metadata key of `reader` into `writer`, each with its own type, but GGUF's own fields,
    the architecture and alignment (the writer sets them) and `drop`; `replace` gives new values."""
    replace = replace or {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", *drop):
            continue
        vtype = f.types[0]
        writer.add_key_value(key, replace.get(key, f.contents()), vtype,
                             sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)


def row_bytes(qtype: T, n: int) -> int:
    """Bytes of one row of `n` values in type `qtype`."""
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's `tensor_allows_quantization` for the architectures jaxllama reads."""
    return n_dims >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)


def with_fallback(qtype: T, n_per_row: int) -> T:
    """llama.cpp's `tensor_type_fallback`: a type whose block divides the row, else F16."""
    if n_per_row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if n_per_row % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def llama_order(names: list[str]) -> list[str]:
    """llama_model_loader's `weight_name_comparer`: layer (-1 for global tensors), then name."""
    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


@dataclass
class QuantizedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last axis = n_per_row)
    source: T
    type: T
    nbytes: int
    imatrix: bool = False


@dataclass
class QuantizedFile:
    path: Path
    file_type: int
    tensors: list[QuantizedTensor] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight as llama-quantize reports them: tensor data bytes * 8 / weights."""
        return self.nbytes * 8 / self.n_weights


def _values(t) -> np.ndarray:
    """A float tensor's values as float32 rows [rows, n_per_row]."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == T.BF16:
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(-1, shape[-1])
    return np.asarray(t.data, dtype=np.float32).reshape(-1, shape[-1])


def plan(reader: GGUFReader, qtype: T, types: Mapping[str, T] | None = None) -> dict[str, T]:
    """The type each tensor gets: `types[name]` where given, else `qtype` (llama-quantize --pure),
    each after the shape fallback; tensors that are not quantized keep theirs."""
    out = {}
    for t in reader.tensors:
        n_per_row = int(t.shape[0])
        if not allows_quantization(t.name, len(t.shape)):
            out[t.name] = T(t.tensor_type)
            continue
        want = (types or {}).get(t.name, qtype)
        out[t.name] = with_fallback(want, n_per_row)
    return out


def quantize_file(base: str | os.PathLike, out: str | os.PathLike, qtype: str | T, *,
                  imatrix: Mapping[str, np.ndarray] | None = None, types: Mapping[str, T] | None = None,
                  metadata: Mapping[str, object] | None = None,
                  progress: Callable[[str], None] | None = None) -> QuantizedFile:
    """Write `out`: GGUF `base` (F32/F16/BF16 tensors) quantized as `llama-quantize --pure base out
    TYPE` would (with `types`, a type per tensor; with `imatrix`, name -> per-column importance,
    as llama-quantize hands it over). `metadata` adds keys (say quantize.imatrix.file)."""
    qt = parse_type(qtype)
    base, out = Path(base), Path(out)
    try:
        reader = GGUFReader(base)
    except Exception as e:  # gguf-py raises ValueError/IndexError/etc. on a malformed file
        raise InvalidInputError(f"{base}: not a readable GGUF file ({e})") from None
    targets = plan(reader, qt, types)
    tensors = {t.name: t for t in reader.tensors}
    for name, target in targets.items():
        src = T(tensors[name].tensor_type)
        if target != src and src not in FLOAT_TYPES:
            raise InvalidInputError(f"{base}: tensor {name} is already quantized ({src.name}); quantize from an "
                                    "F32, F16 or BF16 file (requantizing only adds error)")
        if imatrix is not None and target != src and name in imatrix:
            n = int(tensors[name].shape[0])
            if np.asarray(imatrix[name]).size != n and name != "token_embd.weight":
                raise InvalidInputError(f"imatrix: {name} has {np.asarray(imatrix[name]).size} values, the tensor's "
                                        f"rows {n} (an importance matrix for another model?)")
    arch = str(reader.get_field("general.architecture").contents())
    file_type = FILE_TYPES[qt.name]
    result = QuantizedFile(out, int(file_type))
    with partial_file(out) as tmp:
        w = GGUFWriter(tmp, arch)
        copy_metadata(reader, w, drop=("general.file_type", "general.quantization_version"))
        w.add_quantization_version(QUANTIZATION_VERSION)
        w.add_file_type(int(file_type))
        for key, value in (metadata or {}).items():
            _add(w, key, value)
        order = llama_order(list(tensors))
        for name in order:
            t, target = tensors[name], targets[name]
            shape = tuple(int(d) for d in reversed(t.shape))
            row = row_bytes(target, shape[-1])
            w.add_tensor_info(name, (*shape[:-1], row), np.dtype(np.uint8), row * int(np.prod(shape[:-1])),
                              raw_dtype=target)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in order:
            t, target = tensors[name], targets[name]
            src = T(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape))
            qw = None
            if target == src:
                data = np.asarray(t.data)
            else:
                if imatrix is not None and name in imatrix and np.asarray(imatrix[name]).size == shape[-1]:
                    qw = np.asarray(imatrix[name], np.float32)
                if progress:
                    progress(f"{name} {src.name} -> {target.name}")
                if target == T.F16:
                    data = _values(t).astype(np.float16)
                elif target == T.F32:
                    data = _values(t)
                else:
                    data = quantize(_values(t), target, qw)
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            result.tensors.append(QuantizedTensor(name, shape, src, target, int(data.nbytes), qw is not None))
        w.close()
    return result


def _add(w: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        w.add_string(key, str(value))
