"""Import llama-cpp-python safely: a clear error when the extra is missing, and a crash check.

llama-cpp-python compiles llama.cpp for one CPU; a build for another CPU dies with SIGILL the
first time it runs an instruction this CPU lacks, which takes the whole Python process with it.
So before llama.cpp runs in this process for the first time, it runs once in a child process
(load a GGUF, evaluate a few tokens). If the child dies by a signal, `ReferenceCrashError` says
so in one line, with the fix. A passing check is remembered per llama.cpp build and CPU in the
cache directory, so it costs about a second once, not per process. (It vouches for the build on
this CPU, checked on one model; a kernel only another quantization type reaches is not covered.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import JaxLlamaError
from ..gguf.default_model import cache_dir

INSTALL_HINT = "install it with: pip install 'jaxllama[llamacpp]' (tools/setup.sh builds it for this CPU)"
CRASH_FIX = "llama-cpp-python was built for another CPU: rerun tools/setup.sh"

# Run in the child: load the GGUF, evaluate a few tokens. Exit 0 on success.
PROBE = """
import sys
import llama_cpp
quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
llama_cpp.llama_log_set(quiet, None)
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
if not model:
    sys.exit(f"llama.cpp could not load {sys.argv[1]}")
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 16
cp.n_threads = cp.n_threads_batch = 2
ctx = llama_cpp.llama_init_from_model(model, cp)
tokens = (llama_cpp.llama_token * 4)(1, 2, 3, 4)
batch = llama_cpp.llama_batch_get_one(tokens, 4)
sys.exit(0 if llama_cpp.llama_decode(ctx, batch) == 0 else "llama_decode failed")
"""


class ReferenceUnavailableError(JaxLlamaError):
    """llama.cpp cannot serve as the reference: llama-cpp-python is not installed (the
    `jaxllama[llamacpp]` extra), it crashes on this CPU, or it failed to load the file."""


class ReferenceCrashError(ReferenceUnavailableError):
    """llama.cpp died with a signal (SIGILL, SIGSEGV, abort) in the crash check."""


_CHECKED: set[str] = set()
_LOGGER: list[Any] = []  # keeps the ctypes log callback alive


def is_installed() -> bool:
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def check_reference(model_path: str | os.PathLike, probe: Sequence[str] | None = None,
                    timeout_s: float = 300.0) -> None:
    """Run llama.cpp once in a child process on `model_path`; raise if it dies.

    `probe` replaces the child's command (tests use it to simulate a crash; it is never
    remembered). Raises `ReferenceCrashError` (one line: the signal and the fix) when the child
    is killed by a signal, `ReferenceUnavailableError` when it fails otherwise.
    """
    key = _check_key() if probe is None else None
    if key and (key in _CHECKED or _stamp(key).exists()):
        _CHECKED.add(key)
        return
    cmd = list(probe) if probe is not None else [sys.executable, "-c", PROBE, str(model_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ReferenceUnavailableError(f"llama.cpp check on {model_path} did not finish in {timeout_s:g} s") from None
    if done.returncode < 0:
        raise ReferenceCrashError(f"{CRASH_FIX} (llama.cpp died with {_signal_name(done.returncode)} "
                                  f"in a check on {Path(model_path).name})")
    if done.returncode != 0:
        if "No module named 'llama_cpp'" in done.stderr:
            raise ReferenceUnavailableError(f"llama-cpp-python is not installed; {INSTALL_HINT}")
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ReferenceUnavailableError(f"llama.cpp check on {model_path} failed: {last}")
    if key:
        _CHECKED.add(key)
        _stamp(key).parent.mkdir(parents=True, exist_ok=True)
        _stamp(key).write_text(f"{model_path}\n")


def _check_key() -> str | None:
    """What a passing check vouches for: this llama.cpp build on this CPU."""
    spec = importlib.util.find_spec("llama_cpp") if is_installed() else None
    if spec is None or spec.origin is None:
        return None
    parts = [sys.executable]
    for f in sorted((Path(spec.origin).parent / "lib").glob("*.so*")):
        try:
            st = f.stat()
        except OSError:
            return None
        parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    try:
        parts += [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")][:1]
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _stamp(key: str) -> Path:
    return cache_dir() / "reference-checks" / key


def load_llama_cpp(model_path: str | os.PathLike | None = None) -> Any:
    """The `llama_cpp` module, after the crash check on `model_path` (default: the default model),
    with llama.cpp's log chatter silenced."""
    if not is_installed():
        raise ReferenceUnavailableError(f"llama-cpp-python is not installed; {INSTALL_HINT}")
    if model_path is None:
        from ..gguf.default_model import default_model_path

        model_path = default_model_path()
    check_reference(model_path)
    import llama_cpp

    if not _LOGGER:
        _LOGGER.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
        llama_cpp.llama_log_set(_LOGGER[0], None)
        llama_cpp.llama_backend_init()
    return llama_cpp
