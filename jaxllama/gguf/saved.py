"""Save a converted parameter pytree to one msgpack file, and read it back.

Flax msgpack serialization: plain data, no pickle, so a saved file is data, never code. The
file holds the config, the GGUF metadata, the source file's path and SHA-256 (so anything that
goes back to the GGUF, such as the activation-quantization emulation, can check it is the same
file), the tensor types and the parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import GGUFFormatError, JaxLlamaError
from .config import LlamaConfig
from .convert import Params, convert_params, typed, untyped
from .reader import GGUF_MAGIC

SAVED_FORMAT = "jaxllama-params"
SAVED_VERSION = 2  # 2: native matrices nested under "kernel"/"embedding" (`Blocks`)


@dataclass(frozen=True)
class SavedModel:
    """The parts of a saved file, for `jaxllama.load` to build a `Model` from."""

    config: LlamaConfig
    params: Params
    metadata: dict[str, Any]
    source: Path
    source_sha256: str
    tensor_types: dict[str, str]


def save_params(path: str | os.PathLike, config: LlamaConfig, params: Params, metadata: dict[str, Any],
                source: Path, source_sha256: str, tensor_types: dict[str, str]) -> Path:
    """Write everything `load_saved` needs to one file (atomically: a partial file, then a rename)."""
    blob = {
        "format": SAVED_FORMAT,
        "version": SAVED_VERSION,
        "config": config.to_dict(),
        "source": {"path": str(source), "sha256": source_sha256},
        "metadata": metadata,
        "tensor_types": tensor_types,
        "params": jax.tree.map(np.asarray, untyped(params)),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    from flax import serialization  # here, not at import: flax adds 0.2 s to every CLI start

    tmp.write_bytes(serialization.msgpack_serialize(blob))
    tmp.replace(path)
    return path


def is_saved(path: Path) -> bool:
    """A `.msgpack` file that is not a GGUF: read it with `load_saved`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False  # read_gguf reports the problem
    return head != GGUF_MAGIC and path.suffix == ".msgpack"


def load_saved(path: Path, weights: str = "auto") -> SavedModel:
    """Read a file written by `save_params`, in weight layout `weights`. Raises `GGUFFormatError`."""
    try:
        from flax import serialization

        blob = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(blob, dict) or blob.get("format") != SAVED_FORMAT:
            raise GGUFFormatError(f"{path}: not a jaxllama parameter file")
        if blob.get("version") == 1:
            raise GGUFFormatError(f"{path}: written by an older jaxllama (version 1); save it again from its GGUF")
        if blob.get("version") != SAVED_VERSION:
            raise GGUFFormatError(f"{path}: unsupported parameter file version {blob.get('version')!r}")
        config = LlamaConfig.from_dict(blob["config"])
        params = convert_params(typed(jax.tree.map(jnp.asarray, blob["params"])), weights)
        source = blob["source"]
        return SavedModel(config, params, blob["metadata"], Path(source["path"]), source["sha256"],
                          blob["tensor_types"])
    except JaxLlamaError:
        raise
    except Exception as e:  # msgpack/structure errors on a damaged file
        raise GGUFFormatError(f"{path}: damaged jaxllama parameter file ({type(e).__name__})") from None
