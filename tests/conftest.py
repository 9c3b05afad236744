"""Shared fixtures. The default model and llama.cpp are required: if either is missing the
tests that need them fail (they are never skipped), because parity is the point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TinySpec, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from jaxllama.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def f32_gguf(default_gguf: Path) -> Path:
    """The default model with every tensor dequantized to F32 by gguf.quants (cached)."""
    from jaxllama.default_model import cache_dir
    from jaxllama.llamacpp import export_f32

    path = cache_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not path.exists():
        export_f32(default_gguf, path)
    return path


@pytest.fixture(scope="session")
def default_model(default_gguf):
    import jaxllama

    return jaxllama.load(default_gguf)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """`make(spec, seed)` -> path of a tiny random GGUF, cached per (spec, seed)."""
    made: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
        key = (repr(spec), seed)
        if key not in made:
            made[key] = write_tiny_gguf(root / f"tiny{len(made)}.gguf", spec, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_factory) -> Path:
    return tiny_factory()
