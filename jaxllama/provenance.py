"""What a result written to JSON needs so that someone can reproduce it."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import jax


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(model: Any, tokens: list[int] | None = None, **settings: Any) -> dict[str, Any]:
    """Model file and hash, config, dtype, tokens, settings, library versions and backend."""
    return {
        "model": {"path": str(model.source), "sha256": model.sha256, "dtype": model.dtype,
                  "act_quant": getattr(model, "act_quant", None) is not None,
                  "control_vector": getattr(model, "control", None)},
        "config": model.config.to_dict(),
        "tokens": tokens,
        "settings": settings,
        "versions": {
            d: _version(d) for d in ("jaxllama", "jax", "jaxlib", "flax", "numpy", "gguf", "llama_cpp_python")
        },
        "backend": {"platform": jax.default_backend(), "device": str(jax.devices()[0]), "python": platform.python_version()},
    }
