"""A strict, fast reader for GGUF headers; tensor data stays memory-mapped.

Why not `gguf.GGUFReader`: it builds a numpy view for every element of every metadata array
(~3 s for a 49k-token vocabulary) and, on a truncated or corrupt file, fails with whatever
numpy raises. This reader checks every length against the bytes that remain, so a bad file
gives one `GGUFFormatError` naming the file, the offset and what was being read. Constants
(value types, quantization block sizes) come from the `gguf` package.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFFormatError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<u1", 1),
    GGUFValueType.INT8: ("<i1", 1),
    GGUFValueType.UINT16: ("<u2", 2),
    GGUFValueType.INT16: ("<i2", 2),
    GGUFValueType.UINT32: ("<u4", 4),
    GGUFValueType.INT32: ("<i4", 4),
    GGUFValueType.FLOAT32: ("<f4", 4),
    GGUFValueType.BOOL: ("<u1", 1),
    GGUFValueType.UINT64: ("<u8", 8),
    GGUFValueType.INT64: ("<i8", 8),
    GGUFValueType.FLOAT64: ("<f8", 8),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `shape` is in numpy order (GGUF's `ne` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclass(frozen=True, eq=False)
class GGUFFile:
    """Parsed GGUF header plus a read-only memory map of the file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # uint8 memmap of the whole file (empty for a header-only file)
    #: `fstat` of the descriptor the map was made from: the identity of exactly the bytes read
    stat: os.stat_result | None = None

    def raw(self, name: str) -> np.ndarray:
        """Bytes of tensor `name` as uint8, shaped [*rows, bytes_per_row] (zero-copy)."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block * type_size
        flat = self.data[info.offset : info.offset + info.nbytes]
        return flat.reshape(*info.shape[:-1], row_bytes)

    def release_pages(self) -> None:
        """Drop the pages of the mapped file this process has read from its resident memory
        (`madvise(MADV_DONTNEED)`; they stay in the page cache and are read again on use), so a
        conversion's peak memory does not also hold the whole file."""
        mapping = getattr(self.data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads from a bytes-like buffer."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated or corrupt GGUF: {what} needs {n} bytes")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # Lossless: invalid UTF-8 (a vocabulary entry holding half a character, say) keeps its
        # bytes as surrogate escapes; `.encode("utf-8", "surrogateescape")` gives them back.
        return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary, merges): `string` without a call per item,
        which is most of the start-up time of a 100k-token vocabulary."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = length(buf, pos)
            if pos + 8 + n > end:
                break
            out.append(bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="surrogateescape"))
            pos += 8 + n
        self.pos = pos
        if len(out) < count:  # the same message `string` gives
            self.string(what)
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            dtype, size = _SCALARS[vtype]
            self.need(size, what)
            v = np.frombuffer(self.buf, dtype=dtype, count=1, offset=self.pos)[0].item()
            self.pos += size
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth > 2:
                raise self.fail(f"{what}: arrays nested too deeply")
            etype = self.unpack("<I", what + " element type")
            count = self.unpack("<Q", what + " element count")
            if etype in _SCALARS:
                dtype, size = _SCALARS[etype]
                self.need(count * size, what)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * size
                return arr.astype(bool) if etype == GGUFValueType.BOOL else arr
            if etype in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                self.need(count * 8, what)  # each element has at least an 8-byte length
                if etype == GGUFValueType.STRING:
                    return self.strings(count, what)
                return [self.value(etype, what, depth + 1) for _ in range(count)]
            raise self.fail(f"{what}: unknown array element type {etype}")
        raise self.fail(f"{what}: unknown value type {vtype}")


def _map(path: Path) -> tuple[np.ndarray, os.stat_result]:
    """A read-only uint8 memory map of the file and the `fstat` of the descriptor it was mapped
    from (not a `stat` of the path before or after, which a replaced file would escape), or a
    `GGUFFormatError` saying why not."""
    try:
        if path.is_dir():
            raise GGUFFormatError(f"{path}: is a directory, not a GGUF file")
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size == 0:
                raise GGUFFormatError(f"{path}: empty file, not a GGUF file")
            return np.memmap(fh, dtype=np.uint8, mode="r"), st
    except FileNotFoundError:
        raise GGUFFormatError(f"{path}: no such file") from None
    except PermissionError:
        raise GGUFFormatError(f"{path}: permission denied") from None
    except OSError as e:
        raise GGUFFormatError(f"{path}: cannot read file ({e.strerror or e})") from None


def _read_preamble(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version, tensor count and metadata count; absurd counts are refused early."""
    cur.need(4, "magic")
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise GGUFFormatError(f"{cur.path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise GGUFFormatError(f"{cur.path}: unsupported GGUF version {version}{hint}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    # Every KV pair takes >= 12 bytes, every tensor entry >= 24.
    if n_kv * 12 + n_tensors * 24 > len(cur.buf):
        raise cur.fail(f"corrupt GGUF header: {n_kv} metadata entries and {n_tensors} tensors cannot fit")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.unpack("<I", f"type of {key!r}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    return metadata


def _read_tensor_entry(cur: _Cursor, alignment: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
    """One tensor header entry: name, numpy-order shape, type, offset in the data section, size."""
    name = cur.string("tensor name")
    n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    ne = [cur.unpack("<Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
    type_id = cur.unpack("<I", f"type of tensor {name!r}")
    rel = cur.unpack("<Q", f"data offset of tensor {name!r}")
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown tensor type {type_id}") from None
    if any(d <= 0 for d in ne) or ne[0] % block:
        raise cur.fail(f"tensor {name!r} has invalid shape {ne} for type {ggml_type.name}")
    if rel % alignment:
        raise cur.fail(f"tensor {name!r} data offset {rel} is not aligned to {alignment}")
    nbytes = math.prod(ne[1:]) * (ne[0] // block) * type_size
    return name, tuple(reversed(ne)), ggml_type, rel, nbytes


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and map its tensor data. Raises `GGUFFormatError`."""
    path = Path(path)
    data, st = _map(path)
    size = len(data)
    cur = _Cursor(memoryview(data), path)
    version, n_tensors, n_kv = _read_preamble(cur)
    metadata = _read_metadata(cur, n_kv)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: invalid general.alignment {alignment!r}")

    entries, seen = [], set()
    for _ in range(n_tensors):
        entry = _read_tensor_entry(cur, alignment)
        if entry[0] in seen:
            raise cur.fail(f"duplicate tensor name {entry[0]!r}")
        seen.add(entry[0])
        entries.append(entry)

    data_start = -(-cur.pos // alignment) * alignment if entries else cur.pos
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel, nbytes in entries:
        start = data_start + rel
        if start + nbytes > size:
            raise GGUFFormatError(
                f"{path}: truncated GGUF: tensor {name!r} needs bytes {start}..{start + nbytes}, file has {size}"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    _refuse_overlaps(path, tensors)
    return GGUFFile(path, version, metadata, tensors, data, st)


def _refuse_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes is no file llama.cpp writes: refuse it (one tensor's edit would
    silently change the other)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise GGUFFormatError(f"{path}: tensors {a!r} and {b!r} overlap (bytes {start}..{end - 1} are in both)")
