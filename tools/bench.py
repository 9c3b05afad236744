"""Benchmark jaxllama next to llama.cpp on one GGUF; prints one JSON object.

    .venv/bin/python tools/bench.py [--model PATH] [--repeats 5] [--threads N]

Sections (each a function below): load time next to `gguf.GGUFReader` + `gguf.quants`; forward
compile time for 2 and all layers (scanned) and all layers unrolled; prefill tokens/s at 128 and
512 tokens next to llama.cpp (same file, same threads, logits for every position on both
sides); the cost of tracing every probe at every layer; greedy decode tokens/s at batch 1 next
to llama.cpp and the total of a batch of 8 rows; tokenizing 1 MB next to llama.cpp; peak RSS.
Timings are medians of `--repeats` runs. The machine (CPU model, instruction sets) is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxllama
from jaxllama.generation import Sampler, generate
from jaxllama.gguf import LlamaConfig, params_from_gguf, read_gguf
from jaxllama.gguf.default_model import default_model_path
from jaxllama.model import forward
from jaxllama.reference import LlamaCpp
from jaxllama.tracing.probes import ORDER, RECEIVERS, ProbeSpec

ISA = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def machine() -> dict[str, Any]:
    """CPU model and instruction sets (machines of this kind differ), cores, jax and its backend."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "isa": [f for f in ISA if f in flags], "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0])}


def bench_load(path: Path, repeats: int) -> tuple[dict[str, float], jaxllama.Model]:
    import gguf

    t0 = time.perf_counter()
    f = read_gguf(path)
    c = LlamaConfig.from_gguf(f)
    t1 = time.perf_counter()
    params = jax.block_until_ready(params_from_gguf(f, c))
    t2 = time.perf_counter()
    warm, _ = timed(lambda: jax.block_until_ready(params_from_gguf(read_gguf(path), c)), repeats)
    t3 = time.perf_counter()
    reader = gguf.GGUFReader(path)
    t4 = time.perf_counter()
    for t in reader.tensors:
        gguf.quants.dequantize(t.data, t.tensor_type)
    t5 = time.perf_counter()
    model = jaxllama.Model(c, params, f.metadata, path)
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / "m.msgpack")
        restore, _ = timed(lambda: jax.block_until_ready(jaxllama.load(saved).params), max(1, repeats // 2))
    return {
        "header_and_config": round(t1 - t0, 3),
        "first_load_total_incl_compile": round(t2 - t0, 3),
        "load_warm_median": round(warm, 3),
        "restore_saved_median": round(restore, 3),
        "gguf_reader": round(t4 - t3, 3),
        "gguf_quants_dequantize": round(t5 - t4, 3),
        "gguf_reader_plus_quants": round(t5 - t3, 3),
    }, model


def bench_compile(model: jaxllama.Model) -> dict[str, float]:
    c, params = model.config, model.params

    def compile_time(n_layer: int, scan: bool) -> float:
        cfg = dataclasses.replace(c, n_layer=n_layer)
        p = {"params": dict(params["params"], layers=jax.tree.map(lambda a: a[:n_layer], params["params"]["layers"]))}
        fn = jax.jit(forward, static_argnames=("config", "scan_layers"))
        t = time.perf_counter()
        fn.lower(p, jnp.zeros((1, 128), jnp.int32), cfg, scan_layers=scan).compile()
        return round(time.perf_counter() - t, 3)

    return {"scan_2_layers": compile_time(2, True), f"scan_{c.n_layer}_layers": compile_time(c.n_layer, True),
            f"unrolled_{c.n_layer}_layers": compile_time(c.n_layer, False)}


FWD = jax.jit(forward, static_argnames=("config", "scan_layers", "probes"))


def bench_prefill(model: jaxllama.Model, path: Path, repeats: int, threads: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out = {}
    with LlamaCpp(path, n_ctx=512, n_threads=threads) as ref:
        for n in (128, 512):
            tokens = rng.integers(0, model.config.vocab_size, size=n).tolist()
            batch = jnp.asarray([tokens], jnp.int32)
            t = time.perf_counter()
            jax.block_until_ready(FWD(model.params, batch, model.config))
            first = time.perf_counter() - t
            ours, ours_all = timed(lambda: jax.block_until_ready(FWD(model.params, batch, model.config)), repeats)
            ref.logits(tokens)  # warm-up
            theirs, theirs_all = timed(lambda: ref.logits(tokens), repeats)
            out[str(n)] = {"jaxllama": round(n / ours, 1), "llama_cpp": round(n / theirs, 1),
                           "ratio": round(theirs / ours, 2), "jaxllama_first_call_s": round(first, 3),
                           "jaxllama_runs_s": [round(x, 4) for x in ours_all],
                           "llama_cpp_runs_s": [round(x, 4) for x in theirs_all]}
    return out


def bench_tracing(model: jaxllama.Model, repeats: int) -> dict[str, Any]:
    """Statistics of every probe at every layer through jax.debug callbacks, against none."""
    rng, out = np.random.default_rng(1), {}
    sink = lambda layer, stats, positions, valid: None  # noqa: E731
    RECEIVERS.push(sink)
    try:
        for n in (128, 512):
            batch = jnp.asarray([rng.integers(0, model.config.vocab_size, size=n).tolist()], jnp.int32)

            def traced():
                jax.block_until_ready(FWD(model.params, batch, model.config, probes=ProbeSpec(stats=ORDER)))
                jax.effects_barrier()

            def plain():
                jax.block_until_ready(FWD(model.params, batch, model.config))

            traced(), plain()
            t_on, _ = timed(traced, repeats)
            t_off, _ = timed(plain, repeats)
            out[str(n)] = {"off_s": round(t_off, 4), "all_probes_s": round(t_on, 4), "ratio": round(t_on / t_off, 3),
                           "callbacks_per_call": model.config.n_layer + 1}
    finally:
        RECEIVERS.remove(sink)
    return out


def bench_decode(model: jaxllama.Model, path: Path, repeats: int, threads: int, n_new: int) -> dict[str, Any]:
    greedy = Sampler(temperature=0.0)
    prompt = model.tokenizer.encode("The history of the printing press begins in the fifteenth century")
    out: dict[str, Any] = {"new_tokens": n_new}
    for dtype in ("float32", "bfloat16"):
        m = model if dtype == "float32" else jaxllama.load(path, dtype="bfloat16")
        generate(m, [prompt], n_new, greedy, stop_at_eog=False)  # compile
        one = [generate(m, [prompt], n_new, greedy, stop_at_eog=False).decode_tok_s for _ in range(repeats)]
        rows = [prompt[: 4 + 2 * i] for i in range(8)]
        generate(m, rows, n_new, greedy, stop_at_eog=False)
        eight = [generate(m, rows, n_new, greedy, stop_at_eog=False).decode_tok_s for _ in range(repeats)]
        out[f"jaxllama_{dtype}_batch1"] = round(statistics.median(one), 1)
        out[f"jaxllama_{dtype}_batch8_total"] = round(statistics.median(eight), 1)
    with LlamaCpp(path, n_ctx=512, n_threads=threads) as ref:
        def llama_decode() -> float:
            ref.clear()
            logits = ref.eval(prompt)
            t = time.perf_counter()
            for _ in range(n_new - 1):
                logits = ref.eval([int(np.argmax(logits))])
            return (n_new - 1) / (time.perf_counter() - t)

        llama_decode()
        out["llama_cpp_batch1"] = round(statistics.median(llama_decode() for _ in range(repeats)), 1)
    return out


def bench_tokenizer(model: jaxllama.Model, path: Path, repeats: int) -> dict[str, Any]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    tok = model.tokenizer
    ours, _ = timed(lambda: tok.encode(text, add_special=False), repeats)
    with LlamaCpp(path, n_ctx=16) as ref:
        theirs, _ = timed(lambda: ref.tokenize(text), repeats)
    return {"jaxllama": round(ours, 3), "llama_cpp": round(theirs, 3),
            "tokens": len(tok.encode(text, add_special=False))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default model if omitted)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode measurement (64)")
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    r: dict[str, Any] = {"model": str(path), "machine": machine(), "threads": args.threads, "repeats": args.repeats}
    r["load_s"], model = bench_load(path, args.repeats)
    r["compile_s"] = bench_compile(model)
    r["prefill_tok_s"] = bench_prefill(model, path, args.repeats, args.threads)
    r["tracing"] = bench_tracing(model, args.repeats)
    r["decode_tok_s"] = bench_decode(model, path, args.repeats, args.threads, args.decode_tokens)
    r["tokenize_1mb_s"] = bench_tokenizer(model, path, args.repeats)
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
