"""Native CPU kernels registered with XLA through `jax.ffi`, with pure-JAX fallbacks.

Three kernels. Two for decoding: `gemv`, the product of a few activation rows with a quantized
weight matrix in jaxllama's native layout (`q` int8, `scale`, `offset`), without building the
float32 matrix (XLA:CPU fuses dequantization into a matrix-vector product on one thread only,
REFERENCE §7); and `attend`, one query per row against the filled slots of a layer-stacked KV
cache (XLA's form transposes key blocks and calls its matrix library for tiny products: at 8 rows
that was a third of a decode step). One for prompts and scoring: `dequant`, one layer's matrix in
float32 for XLA's matrix multiplication (XLA's own unpacking of 4-bit blocks ran at a fifth of the
memory bandwidth: with it, native prefill took 1.65x the float32 layout's time). All share their
work out among as many threads as XLA's intra-op pool has (the decode kernels with helper threads
that stay awake between calls, see gemv.cc) and are vectorized for the CPU they run on (AVX-512, AVX2,
or portable C++, chosen when the library loads).

The C++ source ships with the package and is compiled on the user's machine with the system C++
compiler (GCC or clang): by `tools/setup.sh` at install time, otherwise on first use, into the
jaxllama cache (`kernels/gemv-<hash>.so`, the hash covering the source, flags, jaxlib, the
compiler and its version, the CPU's flags, the C library and the Python ABI). A library there is
loaded only if it and its directory are this user's and writable by nobody else (else it is built
in a private directory); one that fails to load is built once more. Without a compiler, off x86,
on a GPU/TPU backend (nothing is compiled there) or with `JAXLLAMA_KERNELS=0`, the same function
runs as pure JAX, giving the same numbers up to float rounding: the order of sums, and the vector
paths' fused multiply-adds (one rounding) where pure JAX and the kernels' portable path round a
product and then a sum (see gemv.cc's portable namespace). `dequant` has no FMA on any path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import JaxLlamaError
from ..gguf.blocks import Blocks

SOURCES = ("gemv.cc", "gemv_body.inc", "attend_body.inc", "dequant_body.inc")
TARGET = "jaxllama_gemv_v3"
ATTEND_TARGET = "jaxllama_attend_v1"
DEQUANT_TARGET = "jaxllama_dequant_v3"
#: Compiler flags. -ffp-contract=off: the dequantization rounds a product, then a sum, as pure JAX
#: does (a fused multiply-add would round once and give other values).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wno-psabi", "-Wno-attributes")
#: Rows of x per call of the kernel (decode steps: one token per row; a batch of more rows calls
#: it again, each row computed alike whatever the batch). Prompts (more than one token per row)
#: are XLA's product on the layer's float32 matrix whatever their size, so a prompt's logits do
#: not change with its batch (on a 2-core Xeon a 30-layer forward of 16 rows took 47 ms through
#: the kernel and 62 ms as XLA's product, 32 rows 89 and 86 ms, 64 rows 173 and 120 ms).
MAX_ROWS = 32


class KernelBuildError(JaxLlamaError):
    """The C++ kernels could not be compiled (no compiler, or it failed)."""


def compiler() -> str | None:
    """The C++ compiler to use: `$CXX`, else c++, g++ or clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.machine()


def library_path(cxx: str | None = None) -> Path:
    """Where the compiled kernels live: named after the sources, the flags, jaxlib, the compiler
    and its version, the CPU's flags, the C library and the Python ABI (a library built for
    another of any of these is never loaded)."""
    from ..gguf.default_model import cache_dir
    import jaxlib

    cxx = cxx or compiler() or "none"
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    where = os.path.realpath(shutil.which(cxx) or cxx)  # `clang++` and `/usr/bin/clang++`: one compiler
    for part in (" ".join(FLAGS), jaxlib.__version__, where, _compiler_version(cxx), _cpu_flags(),
                 " ".join(platform.libc_ver()), str(sysconfig.get_config_var("SOABI"))):
        h.update(part.encode() + b"\0")
    return cache_dir() / "kernels" / f"gemv-{h.hexdigest()[:16]}.so"


def untrusted(path: Path) -> str | None:
    """Why a library (or its directory) at `path` must not be loaded, or None: it must be this
    user's own, no symbolic link, and writable by nobody else (a library's initialiser runs
    on load, with this user's rights)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return "it is writable by group or others"
    return None


def _trusted_place(out: Path) -> Path:
    """`out`, or the same file name in a new private directory (with one warning) when `out` or
    its directory exists and is not this user's alone."""
    for p in (out.parent, out):
        why = untrusted(p) if p.exists() or p.is_symlink() else None
        if why is not None:
            private = Path(tempfile.mkdtemp(prefix="jaxllama-kernels-"))  # mode 0700
            warnings.warn(f"jaxllama: not loading kernels from {p}: {why}; building them in {private}", stacklevel=4)
            return private / out.name
    return out


def build(force: bool = False) -> Path:
    """Compile the kernels for this machine (a few seconds) unless already built; the path of the
    shared library (in the jaxllama cache, or a private directory when the cache's copy cannot
    be trusted, see `untrusted`). Raises `KernelBuildError` with the compiler's message on failure."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX): the kernels run as pure JAX")
    out = _trusted_place(library_path(cxx))
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(Path(__file__).parent / "gemv.cc"), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise KernelBuildError(f"{cxx} failed to run: {e}") from None
    if done.returncode != 0:
        os.unlink(tmp)
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KernelBuildError(f"{cxx} could not compile jaxllama/kernels/gemv.cc: {last}")
    os.replace(tmp, out)  # atomic: concurrent builders never load a half-written library
    return out


def enabled() -> bool:
    """Whether kernels may be used at all (`JAXLLAMA_KERNELS=0` turns them off)."""
    return os.environ.get("JAXLLAMA_KERNELS", "1") != "0"


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """Build if needed, load and register the kernels once per process; None (with one
    warning) when they cannot be had, so callers fall back to pure JAX."""
    if jax.default_backend() != "cpu":  # GPU/TPU: nothing to compile, XLA runs every product
        return None
    try:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
        except OSError:  # a damaged or foreign library: built once more, else pure JAX (below)
            lib = ctypes.cdll.LoadLibrary(str(build(force=True)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllamaGemv), platform="cpu")
        jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(lib.JaxllamaAttend), platform="cpu")
        jax.ffi.register_ffi_target(DEQUANT_TARGET, jax.ffi.pycapsule(lib.JaxllamaDequant), platform="cpu")
        lib.JaxllamaKernelIsa.restype = ctypes.c_char_p
        return lib
    except (KernelBuildError, OSError, AttributeError) as e:
        warnings.warn(f"jaxllama: CPU kernels unavailable, using pure JAX ({e})", stacklevel=3)
        return None


def available() -> bool:
    """True when the CPU kernels are enabled, built and registered in this process."""
    return enabled() and _library() is not None


def isa() -> str:
    """What the CPU matrix products run as: "avx512", "avx2" or "portable" (the kernel's path for
    this CPU, `JAXLLAMA_KERNEL_ISA` forcing a narrower one), or "xla" without kernels."""
    return _library().JaxllamaKernelIsa().decode() if available() else "xla"


def stacked(w: Blocks) -> tuple[jax.Array, ...]:
    """(q, qh, scale, scale_d, offset, offset_d, layer index) of GGUF blocks as the kernel takes
    them: `[L, N, ...]` arrays (blocks without a layer index become one layer) and an int32 `[1]`
    index; a missing array is `[L, N, 0]`."""
    arrays = w.arrays() if w.layer is not None else {k: v[None] for k, v in w.arrays().items()}
    lead = arrays["scale"].shape[:-1]

    def optional(key: str, dtype: jnp.dtype) -> jax.Array:
        return arrays[key] if key in arrays else jnp.zeros((*lead, 0), dtype)

    index = jnp.asarray(0 if w.layer is None else w.layer, jnp.int32).reshape(1)
    return (arrays["q"], optional("qh", jnp.uint8), arrays["scale"], optional("scale_d", jnp.float16),
            optional("offset", arrays["scale"].dtype), optional("offset_d", jnp.float16), index)


def _on_cpu(target: str, out: jax.ShapeDtypeStruct, args: tuple, fallback: Callable[[], jax.Array],
            **attrs) -> jax.Array:
    """The custom call `target` on `args` where the program runs on a CPU, `fallback()` elsewhere
    (one program may be lowered for several platforms)."""
    return lax.platform_dependent(*args, cpu=lambda *a: jax.ffi.ffi_call(target, out)(*a, **attrs),
                                  default=lambda *a: fallback())


def gemv(rows: jax.Array, w: Blocks, fallback: Callable) -> jax.Array:
    """`rows [M, K] @ W.T` for GGUF blocks W, through the CPU kernel when this process has it,
    else `fallback(rows, w.one_layer())`. Stacked blocks (`[L, N, K]`) with a `layer` index are
    read at that layer without copying it out."""
    pure = lambda: fallback(rows, w.one_layer())  # noqa: E731
    if not (rows.shape[0] <= MAX_ROWS and available()):
        return pure()
    arrays = stacked(w)
    out = jax.ShapeDtypeStruct((rows.shape[0], w.rows), jnp.float32)
    return _on_cpu(TARGET, out, (rows, *arrays), pure)


def dequant(w: Blocks, fallback: Callable) -> jax.Array:
    """The matrix `[N, K]` of GGUF blocks (layer `w.layer` of stacked ones) in float32, through
    the CPU kernel when this process has it (the blocks read in place, every thread writing), else
    `fallback(w.one_layer())`; the same values either way, bit for bit."""
    pure = lambda: fallback(w.one_layer())  # noqa: E731
    if not available():
        return pure()
    out = jax.ShapeDtypeStruct((w.rows, w.width), jnp.float32)
    return _on_cpu(DEQUANT_TARGET, out, stacked(w), pure)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array, q_slot: jax.Array,
           key_ok: jax.Array, window: jax.Array | int, scale: float,
           fallback: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """Attention of one query per row, q `[B, Kh, G, d]`, against layer `layer` of the caches k, v
    `[L, B, S, Kh, d]`: keys s with `q_slot[b] - window < s <= q_slot[b]` and `key_ok[b, s]`, a
    float32 softmax over them. `[B, Kh, G, d]`; `fallback(q, k, v)` (the pure-JAX attention) where
    the kernel cannot run, and for its derivative. Reads only the visible slots, so its cost
    follows the filled length."""
    if not (available() and q.shape[-1] % 16 == 0):
        return fallback(q, k, v)
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    rest = (jnp.asarray(layer, jnp.int32).reshape(1), q_slot.astype(jnp.int32), key_ok.astype(bool),
            jnp.asarray(window, jnp.int32).reshape(1))

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return _on_cpu(ATTEND_TARGET, out, (q.astype(jnp.float32), k, v, *rest), lambda: fallback(q, k, v),
                       scale=np.float32(scale))

    # differentiable as the pure-JAX attention is (the kernel has no derivative rule)
    f = jax.custom_vjp(kernel)
    f.defvjp(lambda q, k, v: (kernel(q, k, v), (q, k, v)), lambda res, g: jax.vjp(fallback, *res)[1](g))
    return f(q, k, v)


def main() -> int:
    """`python -m jaxllama.kernels`: build the kernels now (tools/setup.sh runs this)."""
    try:
        print(f"jaxllama kernels: {build(force='--force' in sys.argv)}")
    except KernelBuildError as e:
        print(f"jaxllama kernels: not built: {e}; pure JAX will be used", file=sys.stderr)
    return 0
