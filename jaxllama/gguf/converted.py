"""Converted parameters kept on disk, so that loading the same GGUF again skips the conversion.

Converting the default model's tensors into the native layout is one compiled program, and
tracing, lowering and loading that program takes 0.4 s of a 0.65 s load, every process (the
compilation cache spares the compiling only). `jaxllama.load` therefore writes what it converted
once, as plain `.npy` arrays (read back with `allow_pickle=False`: data, never code) and a JSON
manifest, in `<cache>/converted/<key>/`, and reads it back next time. The key covers the GGUF's
path, size, modification time and inode, the layout, jax's version and the source of this
package's conversion code (`jaxllama/gguf/*.py`), so a changed file, or a changed converter,
never finds a stale entry. A damaged entry is converted anew.

Only the native layout is kept (the compact one: the default model's entry is 92 MiB), and only
for files with at least `MIN_BYTES` of tensor data (tiny test models are converted every time).
`JAXLLAMA_CONVERTED_CACHE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .convert import Params, unflatten_paths

MIN_BYTES = 16 * 2**20  # tensor bytes from which a file's conversion is kept
LAYOUTS = ("native",)  # layouts kept
FORMAT = 1
MANIFEST = "manifest.json"


def enabled() -> bool:
    return os.environ.get("JAXLLAMA_CONVERTED_CACHE", "1") != "0"


def _code_hash() -> str:
    h = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()


def entry_dir(path: Path, layout: str, tensor_bytes: int) -> Path | None:
    """Where the conversion of `path` in `layout` is kept, or None if it is not kept."""
    if not enabled() or layout not in LAYOUTS or tensor_bytes < MIN_BYTES:
        return None
    from .default_model import cache_dir

    try:
        st = path.stat()
        where = str(path.resolve())
    except OSError:
        return None
    ident = {"format": FORMAT, "path": where, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
             "device": st.st_dev, "layout": layout, "jax": jax.__version__, "code": _code_hash()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "converted" / key


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def load(entry: Path | None) -> Params | None:
    """The parameters kept in `entry` (on the default device), or None if there are none or they
    cannot be read back exactly as written (sizes checked against the manifest)."""
    if entry is None or not (entry / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        flat = {}
        for item in manifest["arrays"]:
            if item["file"] is None:
                flat[item["key"]] = None
                continue
            if not re.fullmatch(r"\d+\.npy", item["file"]):  # only the entry's own files are read
                return None
            arr = np.load(entry / item["file"], allow_pickle=False)
            if arr.dtype.str != item["dtype"] or list(arr.shape) != item["shape"]:
                return None
            flat[item["key"]] = jax.block_until_ready(jax.device_put(arr))  # copied: `arr` can go now
            del arr  # one array read at a time: the peak is the parameters plus their largest array
        return unflatten_paths(flat)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(entry: Path | None, params: Params) -> None:
    """Keep `params` in `entry` (best effort: a read-only or full disk only skips it), replacing a
    damaged one. Written to a temporary directory first and renamed, so a reader never sees a
    partial entry."""
    if entry is None:
        return
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
        arrays = []
        for i, (key, value) in enumerate(_flatten(params["params"]).items()):
            if value is None:
                arrays.append({"key": key, "file": None})
                continue
            arr = np.asarray(jax.device_get(value))
            np.save(tmp / f"{i}.npy", arr, allow_pickle=False)
            arrays.append({"key": key, "file": f"{i}.npy", "dtype": arr.dtype.str, "shape": list(arr.shape)})
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "arrays": arrays}))
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry (`load` could not read it) is replaced
        os.replace(tmp, entry)  # fails if another process kept it meanwhile: theirs stays
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
