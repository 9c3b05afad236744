"""The CPU matrix-vector kernel (`jaxllama.kernels`): every instruction-set path against numpy,
the pure-JAX fallback against the kernel on the default model, and a clean fallback when the
kernel cannot be built."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama import kernels
from jaxllama.gguf.blocks import Blocks, pack_nibbles
from jaxllama.model import xla_native_dense

# Scales and offsets as the native layout may hold them: float32, or float16 (GGUF's own), then
# with float16 subnormals among them (every 7th value tiny), which the kernels convert exactly; or
# K-quants' two levels ("two"): int8 multipliers and a float16 factor per 256 values.
SCALES = """
def scales(rng, shape, half):
    s = rng.normal(size=shape)
    if not half:
        return s.astype(np.float32)
    s.flat[::7] *= 1e-5
    return s.astype(np.float16)


def add_scales(rng, leaf, key, shape, kind):
    if kind == "two":
        leaf[key] = jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)
        leaf[key + "_d"] = jnp.asarray(scales(rng, (*shape[:-1], shape[-1] * (leaf["q"].shape[-1] // shape[-1]) // 256), True))
    else:
        leaf[key] = jnp.asarray(scales(rng, shape, kind == "f16"))
"""

# Runs in a child so that JAXLLAMA_KERNEL_ISA is read when the library loads. For int8, packed
# 4-bit and 5-bit q (nibbles plus a plane of fifth bits, groups of 32 only), groups of 16 and 32,
# with and without offsets, float32, float16 and two-level scales (the latter two also over
# several of the kernel's segments of 64 groups), 1..32 rows (and 33: the fallback) and a
# row count that no chunk size divides: the worst error against float64
# numpy, relative to sum |x * w|; and the last row computed alone, which must give the same bits.
CHILD = textwrap.dedent("""
    import concurrent.futures, itertools, json, jax, jax.numpy as jnp, numpy as np
    from jaxllama import kernels
    from jaxllama.gguf.blocks import Blocks, pack_bits, pack_nibbles
    from jaxllama.model import xla_native_dense
    rng = np.random.default_rng(0)
    worst, batch_differs = 0.0, 0
""") + SCALES + textwrap.dedent("""
    for bits, group, offset, kind in itertools.product((8, 4, 5), (16, 32), (False, True), ("f32", "f16", "two")):
        if bits == 5 and group == 16:
            continue
        ks = {"f32": (576,), "f16": (576, 2304), "two": (2304,)}[kind]  # two levels: whole 256-value blocks
        # rows: one, passes of up to 8 rows (3; 8; 8 + 5; four of 8) and 33, past the kernel's 32
        for m, k in itertools.product((1, 3, 8, 13, 32, 33), ks):
            n = 203  # k 2304: 72 or 144 groups, more than one segment of float16 scales
            q = rng.integers(-128 if bits == 8 else 0, 2 ** min(bits, 7), (n, k)).astype(np.int8)
            leaf = {"q": jnp.asarray(q)}
            add_scales(rng, leaf, "scale", (n, k // group), kind)
            if offset:
                add_scales(rng, leaf, "offset", (n, k // group), kind)
            w = np.asarray(Blocks(**leaf).values(), np.float64)
            if bits == 5:
                leaf["qh"] = pack_bits(leaf["q"] >> 4)
            if bits < 8:
                leaf["q"] = pack_nibbles(leaf["q"] & 15)
            x = rng.normal(size=(m, k)).astype(np.float32)
            got = np.asarray(jax.jit(lambda x, l: kernels.gemv(x, Blocks(**l), xla_native_dense))(x, leaf))
            want = x.astype(np.float64) @ w.T
            size = np.abs(x.astype(np.float64)) @ np.abs(w).T  # the scale of a dot's rounding error
            worst = max(worst, float((np.abs(got - want) / size).max()))
            if m <= 32:  # a row's result does not depend on the rows beside it
                alone = np.asarray(jax.jit(lambda x, l: kernels.gemv(x, Blocks(**l), xla_native_dense))(x[-1:], leaf))
                batch_differs += int((alone[0] != got[-1]).sum())
    # Four Python threads running products at once (the kernel's helper threads take one job at a
    # time): each result the same bits as alone.
    x = rng.normal(size=(8, 576)).astype(np.float32)
    leaf = {"q": jnp.asarray(rng.integers(-128, 128, (2000, 576)), jnp.int8),
            "scale": jnp.asarray(scales(rng, (2000, 18), True))}
    f = jax.jit(lambda x, l: kernels.gemv(x, Blocks(**l), xla_native_dense))
    alone = [np.asarray(f(x[i:i + 1], leaf)) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: [np.asarray(f(x[i:i + 1], leaf)) for _ in range(50)], range(8)))
    concurrent_differs = sum(int((r != alone[i]).sum()) for i, rs in enumerate(together) for r in rs)
    print(json.dumps({"isa": kernels.isa(), "worst": worst, "batch_differs": batch_differs,
                      "concurrent_differs": concurrent_differs}))
""")


# The decode attention: one query per row against layer 1 of a stacked cache, rows left-padded
# (key_ok), causal limits inside the cache, a global and two sliding windows (one spanning key
# chunks), head sizes 64, 256 and 16 (one AVX-512 vector),
# against float64 numpy softmax attention over exactly the visible keys.
ATTEND = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jaxllama import kernels
    rng = np.random.default_rng(1)
    worst, used = 0.0, 0
    for d, heads, groups in ((64, 3, 3), (256, 1, 4), (16, 2, 2)):
        for window in (2**30, 5, 300):
            L, B, S = 3, 4, 600  # three key chunks of the kernel (256 keys each)
            q = rng.normal(size=(B, heads, groups, d)).astype(np.float32)
            k = rng.normal(size=(L, B, S, heads, d)).astype(np.float32)
            v = rng.normal(size=(L, B, S, heads, d)).astype(np.float32)
            q_slot = np.array([599, 7, 520, 0], np.int32)
            pad = np.array([0, 3, 250, 0], np.int32)
            key_ok = np.arange(S)[None, :] >= pad[:, None]
            nan = lambda q, k, v: jnp.full(q.shape, jnp.nan)  # noqa: E731 - the kernel must not fall back
            got = np.asarray(jax.jit(lambda *a: kernels.attend(*a, 0.125, fallback=nan))(
                q, k, v, jnp.int32(1), q_slot, key_ok, jnp.int32(window)))
            used += int(not np.isnan(got).any())
            for b in range(B):
                seen = [s for s in range(S) if q_slot[b] - window < s <= q_slot[b] and key_ok[b, s]]
                kb, vb = k[1, b, seen].astype(np.float64), v[1, b, seen].astype(np.float64)
                for h in range(heads):
                    sc = q[b, h].astype(np.float64) @ kb[:, h].T * 0.125
                    p = np.exp(sc - sc.max(-1, keepdims=True))
                    want = (p / p.sum(-1, keepdims=True)) @ vb[:, h]
                    worst = max(worst, float(np.abs(got[b, h] - want).max()))
    print(json.dumps({"isa": kernels.isa(), "worst": worst, "used": used}))
""")


# One layer's matrix in float32 (`kernels.dequant`): int8, packed 4-bit and 5-bit q, groups of 16,
# 32 and 64, with and without offsets, float32, float16 and two-level scales, stacked layers (layer 2 of 3) and a plain
# matrix, against numpy's float32 `scale * q` then `+ offset`: equal bit for bit. The fallback
# would give NaN. `fused` counts values where one FMA would round differently, so the data can
# tell the two apart.
DEQUANT = textwrap.dedent("""
    import itertools, json, jax, jax.numpy as jnp, numpy as np
    from jaxllama import kernels
    from jaxllama.gguf.blocks import Blocks, pack_bits, pack_nibbles
    rng = np.random.default_rng(2)
    mismatched, fused, used = 0, 0, 0
""") + SCALES + textwrap.dedent("""
    def floats(leaf, key, layer):  # the float32 scale (or offset) per group, as numpy computes it
        a = np.asarray(leaf[key] if layer is None else leaf[key][layer]).astype(np.float32)
        if key + "_d" not in leaf:
            return a
        d = np.asarray(leaf[key + "_d"] if layer is None else leaf[key + "_d"][layer]).astype(np.float32)
        return np.repeat(d, a.shape[-1] // d.shape[-1], axis=-1) * a

    for bits, group, offset, kind in itertools.product((8, 4, 5), (16, 32, 64), (False, True), ("f32", "f16", "two")):
        if bits == 5 and group != 32:
            continue
        for layer in (None, 2):
            n, k = 203, 768
            lead = () if layer is None else (3,)
            q = rng.integers(-128 if bits == 8 else 0, 2 ** min(bits, 7), (*lead, n, k)).astype(np.int8)
            leaf = {"q": pack_nibbles(jnp.asarray(q) & 15) if bits < 8 else jnp.asarray(q)}
            add_scales(rng, leaf, "scale", (*lead, n, k // group), kind)
            if bits == 5:
                leaf["qh"] = pack_bits(jnp.asarray(q) >> 4)
            ql, sl = (q if layer is None else q[layer]), floats(leaf, "scale", layer)
            want = np.repeat(sl, group, axis=-1) * ql.astype(np.float32)
            if offset:
                add_scales(rng, leaf, "offset", (*lead, n, k // group), kind)
                o = np.repeat(floats(leaf, "offset", layer), group, axis=-1)
                exact = np.repeat(sl, group, axis=-1).astype(np.float64) * ql + o
                fused += int((exact.astype(np.float32) != want + o).sum())
                want = want + o
            got = np.asarray(jax.jit(lambda l: kernels.dequant(Blocks(**l) if layer is None else Blocks(**l).at(layer), lambda _: jnp.full((n, k), jnp.nan)))(leaf))
            used += int(not np.isnan(got).any())
            mismatched += int((got.view(np.uint32) != want.view(np.uint32)).sum())
    print(json.dumps({"isa": kernels.isa(), "mismatched": mismatched, "fused": fused, "used": used}))
""")


def _child(env: dict, script: str = CHILD) -> dict:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.parametrize("forced", ["", "avx2", "portable"], ids=["cpu-default", "avx2", "portable"])
def test_every_kernel_path_matches_numpy(forced):
    flags = _cpu_flags()
    got = _child({"JAXLLAMA_KERNEL_ISA": forced})
    if forced == "portable" or not {"avx2", "fma", "f16c"} <= flags:  # the vector paths convert float16 scales with F16C
        expect = "portable" if forced == "portable" or "avx2" not in flags else got["isa"]
    elif forced == "avx2":
        expect = "avx2"
    else:  # the widest this CPU has
        expect = "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c"} <= flags else "avx2"
    assert got["isa"] == expect
    # error / sum|x * w|: float32 rounding of a 576-term dot is ~sqrt(576) * 6e-8 at most typically
    # (measured 1e-7 vector paths, 3.5e-7 portable's one sequential sum); a wrong value is ~1
    assert got["worst"] < 1e-6
    assert got["batch_differs"] == 0  # each row alike whatever its batch: same sum, same order
    assert got["concurrent_differs"] == 0


@pytest.mark.parametrize("forced", ["", "avx2", "portable"], ids=["cpu-default", "avx2", "portable"])
def test_decode_attention_kernel_matches_numpy(forced):
    """Every path of the attention kernel (the fallback here would give NaN, so the kernel ran
    each time) against float64 numpy over exactly the visible keys."""
    got = _child({"JAXLLAMA_KERNEL_ISA": forced}, ATTEND)
    assert got["isa"] == (forced or got["isa"]) and got["isa"] != "xla"
    assert got["used"] == 9
    assert got["worst"] < 1e-5  # averages of N(0, 1) values; measured 8e-7 (vector), 2.6e-6 (portable)


@pytest.mark.parametrize("forced", ["", "avx2", "portable"], ids=["cpu-default", "avx2", "portable"])
def test_dequant_kernel_equals_numpy_bit_for_bit(forced):
    """The float32 matrix the kernel builds for prompts and scoring holds exactly the values of
    the float32 layout: a product then a sum, never one FMA."""
    got = _child({"JAXLLAMA_KERNEL_ISA": forced}, DEQUANT)
    assert got["isa"] == (forced or got["isa"]) and got["isa"] != "xla"
    assert got["used"] == 84 and got["fused"] > 1000  # the data tells an FMA apart
    assert got["mismatched"] == 0


def test_stacked_layers_are_read_in_place():
    """With a layer index the kernel reads that layer of the stacked `[L, N, K]` blocks."""
    rng = np.random.default_rng(1)
    leaf = {"q": pack_nibbles(jnp.asarray(rng.integers(0, 16, (3, 40, 64)), jnp.int8)),
            "scale": jnp.asarray(rng.random((3, 40, 2)), jnp.float32),
            "offset": jnp.asarray(rng.random((3, 40, 2)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(2, 64)), jnp.float32)
    f = jax.jit(lambda x, leaf, i: kernels.gemv(x, Blocks(**leaf).at(i), xla_native_dense))
    for i in range(3):
        want = np.asarray(x, np.float64) @ np.asarray(Blocks(**leaf).map(lambda v: v[i]).values(), np.float64).T
        np.testing.assert_allclose(np.asarray(f(x, leaf, jnp.int32(i))), want, rtol=1e-5, atol=1e-5)


DECODE = textwrap.dedent("""
    import json, sys, jax, jax.numpy as jnp, numpy as np, jaxllama
    from jaxllama import kernels
    from jaxllama.generation import generate
    from jaxllama.model import forward_step, init_cache
    m = jaxllama.load(sys.argv[1])
    ids = m.tokenizer.encode("The history of the printing press begins in the fifteenth century")
    step = jax.jit(forward_step, static_argnames=("config",))
    cache, rows = init_cache(m.config, 2, 32), []
    for i, t in enumerate(ids):  # two rows, one token each per step: the decode step's products
        logits, cache = step(m.params, jnp.asarray([[t], [ids[0]]]), cache, jnp.int32(i), jnp.zeros(2, jnp.int32),
                             m.config)
        rows.append(np.asarray(logits)[0, 0].tolist())
    print(json.dumps({"isa": kernels.isa(), "logits": rows,
                      "tokens": generate(m, [ids], 16, stop_at_eog=False).tokens[0]}))
""")


def test_kernel_and_pure_jax_agree_on_the_default_model(default_gguf):
    """The decode step gives the same logits with the kernel as with XLA's own products
    (JAXLLAMA_KERNELS=0), and generation the same greedy tokens (default model)."""
    runs = []
    for flag in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", DECODE, str(default_gguf)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "JAXLLAMA_KERNELS": flag})
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    kernel, xla = runs
    assert kernel["isa"] != "xla" and xla["isa"] == "xla"
    a, b = np.asarray(kernel["logits"]), np.asarray(xla["logits"])
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert kernel["tokens"] == xla["tokens"]


def test_no_compiler_falls_back_to_pure_jax_with_one_warning(tmp_path):
    script = textwrap.dedent("""
        import warnings, jax.numpy as jnp, numpy as np
        from jaxllama import kernels
        from jaxllama.model import xla_native_dense
        from jaxllama.gguf.blocks import Blocks
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            leaf = Blocks(jnp.ones((8, 32), jnp.int8), jnp.ones((8, 1), jnp.float32))
            y = kernels.gemv(jnp.ones((1, 32)), leaf, xla_native_dense)
            kernels.gemv(jnp.ones((1, 32)), leaf, xla_native_dense)
        print(kernels.isa(), float(y[0, 0]), len([x for x in w if "kernels unavailable" in str(x.message)]))
    """)
    env = {**os.environ, "JAXLLAMA_CACHE": str(tmp_path), "CXX": "/bin/false", "PATH": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["xla", "32.0", "1"]
    assert not list(tmp_path.glob("kernels/*.so"))


PLANTED = textwrap.dedent("""
    import json, warnings
    from jaxllama import kernels
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ok = kernels.available()
        where = str(kernels.build())
    print(json.dumps({"ok": ok, "isa": kernels.isa(), "where": where, "warnings": [str(x.message) for x in w]}))
""")


def _fake_compiler(tmp_path: Path) -> dict:
    """An environment whose "compiler" copies this machine's already built kernels to its `-o`
    (a real build takes minutes; what is tested is where a library is built and what is loaded)."""
    real = kernels.build()
    cxx = tmp_path / "fake-c++"
    cxx.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ "$1" = -o ]; then cp "%s" "$2"; fi; shift; done\n' % real)
    cxx.chmod(0o755)
    return {"CXX": str(cxx), "JAXLLAMA_CACHE": str(tmp_path / "cache")}


def _cache_library_path(env: dict) -> Path:
    code = "from jaxllama import kernels; print(kernels.library_path())"
    return Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, **env}).stdout.strip())


def test_a_world_writable_library_in_the_cache_is_never_loaded(tmp_path):
    env = _fake_compiler(tmp_path)
    lib = _cache_library_path(env)
    marker = tmp_path / "initialiser-ran"
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void hi(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib.parent.mkdir(parents=True)
    subprocess.run([kernels.compiler(), "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    lib.chmod(0o777)
    got = _child(env, PLANTED)
    assert not marker.exists()  # its initialiser never ran
    assert got["ok"] and got["isa"] != "xla" and Path(got["where"]).parent != lib.parent  # built privately
    assert any("writable by group or others" in m and str(lib) in m for m in got["warnings"])
    lib.chmod(0o755)
    lib.parent.chmod(0o777)  # the directory, too
    got = _child(env, PLANTED)
    assert not marker.exists() and Path(got["where"]).parent != lib.parent
    assert any(f"not loading kernels from {lib.parent}" in m for m in got["warnings"])


def test_a_library_that_fails_to_load_is_built_once_more(tmp_path):
    env = _fake_compiler(tmp_path)
    where = _cache_library_path(env)
    where.parent.mkdir(parents=True)
    where.write_bytes(b"\x7fELF not really")  # ours, private, but no library
    got = _child(env, PLANTED)
    assert got["ok"] and got["warnings"] == [] and got["where"] == str(where)
    assert where.read_bytes() == kernels.build().read_bytes()  # rebuilt in place


CLANG = shutil.which("clang++")


@pytest.mark.skipif(CLANG is None and not os.environ.get("JAXLLAMA_REQUIRE_CLANG"),
                    reason="clang++ is not on PATH (CI installs it and sets JAXLLAMA_REQUIRE_CLANG=1)")
def test_kernels_built_with_clang_match_numpy():
    """No GCC-only pragmas: clang builds the same kernels (vector paths through its attribute
    pragma, F16C found through cpuid), with the same numbers; the float32 matrices bit for bit.
    The library is keyed by compiler, so this is clang's build: made here on first use (two
    minutes of clang -O3 on 2 cores), or by `.ci/run` before the tests. The widest path only."""
    assert CLANG is not None, "JAXLLAMA_REQUIRE_CLANG is set but clang++ is not on PATH"
    env = {"CXX": CLANG}
    where = subprocess.run([sys.executable, "-c", "from jaxllama import kernels; print(kernels.library_path())"],
                           capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    assert "gemv-" in where and where.strip() != str(kernels.library_path())  # not GCC's library
    got = _child(env)
    flags = _cpu_flags()
    widest = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c"} <= flags else
              "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable")
    assert got["isa"] == widest
    assert got["worst"] < 1e-6 and got["batch_differs"] == 0
    deq = _child(env, DEQUANT)
    assert deq["used"] == 84 and deq["mismatched"] == 0
