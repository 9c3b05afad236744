"""What every benchmark section uses: timing, the machine's description, peak memory, child
processes that report one JSON object, and the table of kernels a model's products run through."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


ISA = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `repeats` calls, and all of them."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def machine() -> dict[str, Any]:
    """CPU model and instruction sets (machines of this kind differ), cores, jax and its backend."""
    import jax

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    from .. import kernels

    return {"cpu": model, "isa": [f for f in ISA if f in flags], "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "matvec_kernel": kernels.isa()}


def kernel_table(model: Any) -> list[dict[str, Any]]:
    """Per matrix of `model`: its GGUF types, how the native layout holds it (bits per value,
    group, scale dtype) and the kernels its products run through: decode steps (one token per
    row) through `gemv` (this CPU's `isa`), prompts and scoring through `dequant` + XLA's matrix
    product; "xla" where no kernel is built (or off CPU)."""
    from .. import kernels
    from ..gguf.blocks import Blocks
    from ..gguf.convert import MATRICES, matrix_tensors

    p = model.params["params"]
    isa = kernels.isa()
    rows = []
    for short in MATRICES:
        leaf = p["layers"].get(short) if short != "output" else (p.get("output") or p["token_embd"])
        names = matrix_tensors(short, model.config.n_layer, model.tensor_types)
        types = sorted({model.tensor_types[n] for n in names})
        w = leaf.get("kernel", leaf.get("embedding"))
        if not isinstance(w, Blocks):
            rows.append({"matrix": short, "gguf_types": types, "layout": "float32", "decode": "xla", "prompt": "xla"})
            continue
        rows.append({"matrix": short, "gguf_types": types, "layout": f"{w.bits}-bit",
                     "group": w.group, "scale": str(w.scale.dtype),
                     "offset": w.offset is not None, "decode": f"gemv ({isa})" if isa != "xla" else "xla (fused)",
                     "prompt": f"dequant ({isa}) + XLA dot" if isa != "xla" else "xla"})
    return rows


def peak_rss_mb(field: str = "VmHWM") -> float:
    """This process's peak resident memory in MB (or another /proc/self/status field: VmRSS is
    the current one).

    VmHWM starts afresh at exec; `getrusage().ru_maxrss`, the fallback off Linux, does not
    (Linux carries it over fork and exec, so a child of a big benchmark process reports its
    parent's peak).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_peak_rss() -> bool:
    """Start this process's VmHWM afresh from its current RSS (Linux: `/proc/self/clear_refs`),
    so a later peak is that of what ran since; False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def child_json(args: list[str], timeout: float = 1800) -> tuple[dict[str, Any], float]:
    """Run `python *args`, whose last line of output is one JSON object: that object and the wall time."""
    t = time.perf_counter()
    done = run_child(args, timeout)
    wall = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"benchmark child {' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall
