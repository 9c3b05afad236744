"""Benchmark jaxllama next to llama.cpp on one GGUF; prints one JSON object.

    .venv/bin/python tools/bench.py [--model PATH] [--repeats 5] [--threads N]

Measures: load time (header, conversion with and without compilation, reload of a saved
file) next to `gguf.GGUFReader` + `gguf.quants`; forward compile time for 2 and all layers
(scanned) and all layers unrolled; prefill tokens/s at 128 and 512 tokens for jaxllama and for
llama.cpp (same file, same thread count, logits for every position on both sides); the cost
of tracing every probe at every layer; greedy decode tokens/s at batch 1 next to llama.cpp and
the total of a batch of 8 rows (float32 and bfloat16 weights); tokenizing 1 MB next to
llama.cpp; peak RSS.
Timings are medians of `--repeats` runs.
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

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default model if omitted)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode measurement (64)")
    args = ap.parse_args()

    import gguf

    import jaxllama
    from jaxllama.gguf.config import LlamaConfig
    from jaxllama.gguf.default_model import default_model_path
    from jaxllama.gguf.reader import read_gguf
    from jaxllama.reference import LlamaCpp
    from jaxllama.model import forward
    from jaxllama.gguf.convert import params_from_gguf

    path = Path(args.model) if args.model else default_model_path()
    r: dict = {
        "model": str(path),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
        },
        "threads": args.threads,
        "repeats": args.repeats,
    }

    # --- loading
    t0 = time.perf_counter()
    f = read_gguf(path)
    c = LlamaConfig.from_gguf(f)
    t1 = time.perf_counter()
    params = jax.block_until_ready(params_from_gguf(f, c))
    t2 = time.perf_counter()
    warm, _ = timed(lambda: jax.block_until_ready(params_from_gguf(read_gguf(path), c)), args.repeats)
    t3 = time.perf_counter()
    reader = gguf.GGUFReader(path)
    t4 = time.perf_counter()
    for t in reader.tensors:
        gguf.quants.dequantize(t.data, t.tensor_type)
    t5 = time.perf_counter()
    model = jaxllama.Model(c, params, f.metadata, path)
    with tempfile.TemporaryDirectory() as tmp:
        saved = model.save(Path(tmp) / "m.msgpack")
        restore, _ = timed(lambda: jax.block_until_ready(jaxllama.load(saved).params), max(1, args.repeats // 2))
    r["load_s"] = {
        "header_and_config": round(t1 - t0, 3),
        "first_load_total_incl_compile": round(t2 - t0, 3),
        "load_warm_median": round(warm, 3),
        "restore_saved_median": round(restore, 3),
        "gguf_reader": round(t4 - t3, 3),
        "gguf_quants_dequantize": round(t5 - t4, 3),
        "gguf_reader_plus_quants": round(t5 - t3, 3),
    }

    # --- compile time vs depth
    def compile_time(n_layer: int, scan: bool) -> float:
        cfg = dataclasses.replace(c, n_layer=n_layer)
        p = {"params": dict(params["params"], layers=jax.tree.map(lambda a: a[:n_layer], params["params"]["layers"]))}
        tokens = jnp.zeros((1, 128), jnp.int32)
        fn = jax.jit(forward, static_argnames=("config", "scan_layers"))
        t = time.perf_counter()
        fn.lower(p, tokens, cfg, scan_layers=scan).compile()
        return round(time.perf_counter() - t, 3)

    r["compile_s"] = {
        "scan_2_layers": compile_time(2, True),
        f"scan_{c.n_layer}_layers": compile_time(c.n_layer, True),
        f"unrolled_{c.n_layer}_layers": compile_time(c.n_layer, False),
    }

    # --- prefill, side by side
    rng = np.random.default_rng(0)
    ref = LlamaCpp(path, n_ctx=512, n_threads=args.threads)
    fwd = jax.jit(forward, static_argnames=("config", "scan_layers", "probes"))
    r["prefill_tok_s"] = {}
    for n in (128, 512):
        tokens = rng.integers(0, c.vocab_size, size=n).tolist()
        batch = jnp.asarray([tokens], jnp.int32)
        t = time.perf_counter()
        jax.block_until_ready(fwd(params, batch, c))
        compile_and_run = time.perf_counter() - t
        ours, ours_all = timed(lambda: jax.block_until_ready(fwd(params, batch, c)), args.repeats)
        ref.logits(tokens)  # warm-up
        theirs, theirs_all = timed(lambda: ref.logits(tokens), args.repeats)
        r["prefill_tok_s"][str(n)] = {
            "jaxllama": round(n / ours, 1),
            "llama_cpp": round(n / theirs, 1),
            "jaxllama_first_call_s": round(compile_and_run, 3),
            "jaxllama_runs_s": [round(x, 4) for x in ours_all],
            "llama_cpp_runs_s": [round(x, 4) for x in theirs_all],
        }
    ref.close()

    # --- tracing cost: statistics of every probe at every layer through jax.debug callbacks
    from jaxllama.tracing.probes import ORDER, SINKS, ProbeSpec

    received = []
    SINKS.append(lambda layer, stats: received.append(layer))
    spec = ProbeSpec(stats=ORDER)
    r["tracing"] = {}
    for n in (128, 512):
        batch = jnp.asarray([rng.integers(0, c.vocab_size, size=n).tolist()], jnp.int32)

        def traced():
            jax.block_until_ready(fwd(params, batch, c, probes=spec))
            jax.effects_barrier()

        def plain():
            jax.block_until_ready(fwd(params, batch, c))

        traced(), plain()
        t_on, _ = timed(traced, args.repeats)
        t_off, _ = timed(plain, args.repeats)
        r["tracing"][str(n)] = {"off_s": round(t_off, 4), "all_probes_s": round(t_on, 4),
                                "ratio": round(t_on / t_off, 3), "callbacks_per_call": c.n_layer + 1}
    SINKS.clear()

    # --- decode: batch 1 next to llama.cpp, and a batch of 8 rows
    from jaxllama.generation import generate
    from jaxllama.generation.sampling import Sampler

    greedy = Sampler(temperature=0.0)
    prompt = model.tokenizer.encode("The history of the printing press begins in the fifteenth century")
    n_new = args.decode_tokens
    r["decode_tok_s"] = {}
    for dtype in ("float32", "bfloat16"):
        m = model if dtype == "float32" else jaxllama.load(path, dtype="bfloat16")
        generate(m, [prompt], n_new, greedy, stop_at_eog=False)  # compile
        one = [generate(m, [prompt], n_new, greedy, stop_at_eog=False).decode_tok_s for _ in range(args.repeats)]
        rows = [prompt[: 4 + 2 * i] for i in range(8)]
        generate(m, rows, n_new, greedy, stop_at_eog=False)
        eight = [generate(m, rows, n_new, greedy, stop_at_eog=False).decode_tok_s for _ in range(args.repeats)]
        r["decode_tok_s"][f"jaxllama_{dtype}_batch1"] = round(statistics.median(one), 1)
        r["decode_tok_s"][f"jaxllama_{dtype}_batch8_total"] = round(statistics.median(eight), 1)
    ref = LlamaCpp(path, n_ctx=512, n_threads=args.threads)

    def llama_decode() -> float:
        ref.llm.reset()
        ref.llm.eval(prompt)
        t = time.perf_counter()
        for _ in range(n_new - 1):
            ref.llm.eval([int(np.argmax(ref.llm.scores[ref.llm.n_tokens - 1]))])
        return (n_new - 1) / (time.perf_counter() - t)

    llama_decode()
    r["decode_tok_s"]["llama_cpp_batch1"] = round(statistics.median(llama_decode() for _ in range(args.repeats)), 1)
    r["decode_tok_s"]["new_tokens"] = n_new

    # --- tokenizer: 1 MB of text
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 1
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    tok = model.tokenizer
    ours, _ = timed(lambda: tok.encode(text, add_special=False), args.repeats)
    theirs, _ = timed(lambda: ref.tokenize(text), args.repeats)
    r["tokenize_1mb_s"] = {"jaxllama": round(ours, 3), "llama_cpp": round(theirs, 3),
                           "tokens": len(tok.encode(text, add_special=False))}
    ref.close()
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
