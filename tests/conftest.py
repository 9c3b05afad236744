"""Shared fixtures. The default model and llama.cpp are required: if either is missing the
tests that need them fail (they are never skipped), because parity is the point. Tests that run
llama.cpp in this process carry the `llamacpp` mark (see `reference_gate`)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Compiled programs go to this session's own persistent cache (inherited by the CLI processes the
# tests start): a program that another process (a second test run, a user's CLI) is writing at the
# same moment is never read half-written; XLA aborts the process on one (seen once, 2026-12-07).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxllama-xla-"))
# Parallel workers (pytest-xdist, see pyproject.toml) share the cores: llama.cpp gets one thread in
# each, since its threads spin at barriers and a descheduled one stalls every graph node. Results do
# not depend on its thread count (each output row is computed by one thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("JAXLLAMA_REFERENCE_THREADS", "1")
# This process itself (which compiles hundreds of programs) keeps none: twice, once writing and once
# reading, XLA's executable (de)serialisation crashed the whole run in a late scoring test when the
# in-process CLI calls had turned the persistent cache on. Not reproduced in a short process; the
# CLI processes the tests start still use the cache above.
import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference_gate import pytest_configure, pytest_runtest_setup  # noqa: E402,F401
from tiny_models import TinySpec, write_tiny_gguf  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from jaxllama.gguf.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def f32_gguf(default_gguf: Path) -> Path:
    """The default model with every tensor dequantized to F32 by gguf.quants (cached)."""
    from jaxllama.gguf.default_model import cache_dir
    from jaxllama.reference import export_f32

    path = cache_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not path.exists():
        export_f32(default_gguf, path)
    return path


@pytest.fixture(scope="session")
def q8_0_gguf(f32_gguf: Path) -> Path:
    """The F32 re-export with its matrices re-quantized to Q8_0 by gguf.quants (cached)."""
    from jaxllama.gguf.default_model import cache_dir
    from jaxllama.reference import requantize

    path = cache_dir() / "SmolLM2-135M-Instruct.requant-Q8_0.gguf"
    if not path.exists():
        requantize(f32_gguf, path, "Q8_0")
    return path


@pytest.fixture(scope="session")
def offgrid_gguf(default_gguf: Path) -> Path:
    """The default model's F32 re-export with 0.05 x each matrix's std of seeded noise (cached): a
    base off every quantization grid."""
    from jaxllama.gguf.default_model import cache_dir
    from jaxllama.reference.export import export_offgrid

    path = cache_dir() / "SmolLM2-135M-Instruct.offgrid-F32.gguf"
    if not path.exists():
        export_offgrid(default_gguf, path)
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


LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # as PyPI serves it


@pytest.fixture(scope="session")
def llamacpp_vocab_dir() -> Path:
    """llama.cpp's tokenizer test vocabularies (`ggml-vocab-*.gguf` with `.inp`/`.out`), taken
    from the llama-cpp-python sdist: fetched once with pip into the jaxllama cache, hash-checked,
    and only `vendor/llama.cpp/models/ggml-vocab-*` extracted."""
    from jaxllama.gguf.default_model import cache_dir

    return llamacpp_vocabs(cache_dir() / "llama-cpp-python-sdist")


def llamacpp_vocabs(root: Path) -> Path:
    """The vocabularies under `root/models`, from the sdist in `root` (downloaded if absent)."""
    import subprocess
    import tarfile

    from jaxllama.gguf.default_model import sha256_file

    models = root / "models"
    done = models / ".complete"
    if done.exists():
        return models
    root.mkdir(parents=True, exist_ok=True)
    archives = sorted(root.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_SDIST, "-d", str(root)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        archives = sorted(root.glob("llama_cpp_python-0.3.36.tar.gz"))
        assert run.returncode == 0 and archives, f"pip download {LLAMA_CPP_SDIST} failed: {run.stderr[-2000:]}"
    digest = sha256_file(archives[0])
    if digest != LLAMA_CPP_SDIST_SHA256:
        archives[0].unlink()
        pytest.fail(f"{archives[0].name}: sha256 {digest}, expected {LLAMA_CPP_SDIST_SHA256}; removed it", pytrace=False)
    models.mkdir(exist_ok=True)
    with tarfile.open(archives[0], "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if (member.isfile() and len(parts) == 5 and parts[1:4] == ["vendor", "llama.cpp", "models"]
                    and parts[4].startswith("ggml-vocab-")):
                src = tar.extractfile(member)
                assert src is not None
                (models / parts[4]).write_bytes(src.read())
    done.write_text(LLAMA_CPP_SDIST + "\n")
    return models


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M: four PyPI part packages, joined and hash-checked (cached)."""
    from jaxllama.gguf.default_model import known_model_path

    return known_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB): six PyPI part packages, joined and hash-checked (cached)."""
    from jaxllama.gguf.default_model import known_model_path

    return known_model_path("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def gemma3_f32(gemma3_gguf) -> Path:
    """Gemma 3 270M with every tensor dequantized to F32 by gguf.quants (cached)."""
    from jaxllama.gguf.default_model import cache_dir
    from jaxllama.reference import export_f32

    path = cache_dir() / "gemma-3-270m.F32.gguf"
    if not path.exists():
        export_f32(gemma3_gguf, path)
    return path


RELEASE_ABOVE_MB = 3000  # this process's resident memory past which compiled programs are dropped


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program and traced function after a test module once this process holds
    more than `RELEASE_ABOVE_MB`: one process runs the whole suite, and three full runs aborted
    inside XLA (compiling, or reading or writing a cached executable) in the same late scoring
    test once the process had grown past 7 GB; a short process running those tests passes.
    Below the threshold the programs stay, so the next module does not compile them again."""
    yield
    import gc

    from jaxllama.bench.common import peak_rss_mb
    from jaxllama.scoring import kernels as scoring_kernels

    if peak_rss_mb("VmRSS") < RELEASE_ABOVE_MB:
        return
    jax.clear_caches()
    scoring_kernels._COMPILED.clear()  # scoring's own ahead-of-time executables
    gc.collect()
