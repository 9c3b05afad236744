"""Build settings for llama-cpp-python that match the CPU this runs on.

A native build (`-march=native`) dies with SIGILL on CPUs that report AMX, and a build with
AVX-512 forced on dies on AVX2-only CPUs (shared REFERENCE.md §2). So: `GGML_NATIVE=OFF`, AMX
never, and each x86 extension on exactly when the CPU reports it. pip caches built wheels by
sdist, not by `CMAKE_ARGS`, so the wheel is kept in a directory named after the flag set.

Standard library only: `tools/setup.sh` runs it before anything is installed.

    python3 tools/llamacpp_build.py cmake-args   # the CMAKE_ARGS for this CPU ($CMAKE_ARGS wins)
    python3 tools/llamacpp_build.py wheel-dir    # where the wheel for this flag set lives
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

# ggml CMake option -> the CPU flag (as /proc/cpuinfo spells it) that allows it.
GGML_OPTIONS: tuple[tuple[str, str], ...] = (
    ("GGML_AVX", "avx"),
    ("GGML_AVX2", "avx2"),
    ("GGML_FMA", "fma"),
    ("GGML_F16C", "f16c"),
    ("GGML_AVX_VNNI", "avx_vnni"),
    ("GGML_AVX512", "avx512f"),
    ("GGML_AVX512_VNNI", "avx512_vnni"),
    ("GGML_AVX512_BF16", "avx512_bf16"),
    ("GGML_AVX512_VBMI", "avx512vbmi"),
)
# Options that are always off, whatever the CPU reports (AMX tiles crashed the native build).
ALWAYS_OFF: tuple[str, ...] = ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The instruction-set flags of the first `flags` line of a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """Flags of this machine's CPU from /proc/cpuinfo (Linux). Elsewhere none are known, and
    the build falls back to ggml's portable baseline: slow, but it never dies with SIGILL."""
    try:
        return parse_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def enabled_options(flags: frozenset[str]) -> list[str]:
    """The ggml options this flag set turns on, in the table's order."""
    return [option for option, flag in GGML_OPTIONS if flag in flags]


def cmake_args(flags: frozenset[str]) -> str:
    """`CMAKE_ARGS` for llama-cpp-python: every x86 option set explicitly, AMX and native off."""
    on = set(enabled_options(flags))
    parts = [f"-D{name}=OFF" for name in ALWAYS_OFF]
    parts += [f"-D{option}={'ON' if option in on else 'OFF'}" for option, _ in GGML_OPTIONS]
    return " ".join(parts)


def flag_set_name(flags: frozenset[str]) -> str:
    """A directory-safe name of the flag set, so a wheel is reused only on a matching CPU."""
    on = [flag for option, flag in GGML_OPTIONS if option in enabled_options(flags)]
    return f"{platform.machine() or 'cpu'}-" + ("-".join(on) if on else "baseline")


def wheel_dir(flags: frozenset[str], custom_args: str | None = None) -> Path:
    """Per-flag-set wheel directory under the jaxllama cache. A user's own `CMAKE_ARGS` (a CUDA
    build, say) get a directory named after their hash instead."""
    base = os.environ.get("JAXLLAMA_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxllama")
    version = LLAMA_CPP_PYTHON.split("==")[1]
    if custom_args:
        name = "custom-" + hashlib.sha256(custom_args.encode()).hexdigest()[:16]
    else:
        name = flag_set_name(flags)
    return Path(base) / "wheels" / f"llama-cpp-python-{version}-{name}"


def main(argv: list[str]) -> int:
    flags = cpu_flags()
    commands = {
        "cmake-args": lambda: os.environ.get("CMAKE_ARGS") or cmake_args(flags),
        "wheel-dir": lambda: str(wheel_dir(flags, os.environ.get("CMAKE_ARGS"))),
        "package": lambda: LLAMA_CPP_PYTHON,
    }
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: llamacpp_build.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    print(commands[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
