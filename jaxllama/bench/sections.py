"""`jaxllama bench` (also `tools/bench.py`): jaxllama next to llama.cpp on one GGUF, as JSON.

Each section runs our side and llama.cpp's (same file, same thread count) in one process tree,
repeats, and reports medians and ratios (ours / llama.cpp, higher is better for jaxllama). The
machine (CPU model, instruction sets, cores) is printed with them: machines differ, so only
ratios measured in one run compare. Sections (`--only a,b`):

  load      GGUF -> parameters, per weight layout (warm, median), and peak RSS of a load
  prefill   tokens/s of a 128- and 512-token forward (logits for every position on both sides)
  decode    greedy tokens/s at batch 1 and the total of 8 rows in one batch (llama.cpp: 8
            sequences in one batch through its low-level API)
  fill      decode tokens/s with 128, 1,024 and 4,096 tokens in a cache of 4,352 slots
  latency   process start to the first generated token of `jaxllama generate --chat` (warm
            caches) next to llama-cpp-python's start to its whole 30-token chat answer
  memory    RSS of a process that loads the model and decodes 64 tokens, per layout: whole-run
            peak, after the load, and peak while decoding
  tracing   cost of statistics of every probe at every layer
  tokenize  1 MB of text
  scoring   perplexity of a text (GPL-3, ctx 512): whole run and steady state next to
            llama-perplexity's batching, and peak RSS scoring one long row (bench/scoring.py)
  patching  an activation-patching sweep as `patch_sweep` runs it (batched, resumed at the patched
            layer, unchanged cells skipped) against the same cells one by one, each a whole
            forward, and each saving alone (no llama.cpp side)
  device    no llama.cpp: prefill and decode on the JAX backend at hand (a GPU, say), the decode
            step's share of a measured copy bandwidth, and the compiled kernels (bench/device.py)

The default is every section but `device`, which `--only device` (with `fill`) runs where
llama.cpp does not (an accelerator machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import child_json, kernel_table, machine, peak_rss_mb, reset_peak_rss, run_child, timed

SECTIONS = ("load", "prefill", "decode", "fill", "latency", "memory", "tracing", "tokenize", "scoring", "patching",
            "quant", "sensitivity", "device")
# `device` is for machines where llama.cpp's side is not the point; `sensitivity` takes ~20 minutes
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ("device", "sensitivity"))
LAYOUTS = ("native", "float32")
CHAT = "Write one sentence about the sea."


def _ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 2) if theirs else float("nan")


def bench_load(path: Path, repeats: int) -> dict[str, Any]:
    import jax

    import jaxllama

    out: dict[str, Any] = {}
    for layout in LAYOUTS:
        jax.block_until_ready(jaxllama.load(path, weights=layout).params)  # compile the conversion
        med, _ = timed(lambda: jax.block_until_ready(jaxllama.load(path, weights=layout).params), repeats)
        out[f"{layout}_warm_s"] = round(med, 3)
    out["peak_rss_mb"] = {layout: _child_rss(path, "load", layout) for layout in LAYOUTS}
    out["baseline_rss_mb"] = _child_rss(path, "baseline", "native")
    return out


def bench_prefill(models: dict, path: Path, repeats: int, threads: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ..model import forward_jit
    from ..reference import LlamaCpp

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    with LlamaCpp(path, n_ctx=512, n_threads=threads) as ref:
        for n in (128, 512):
            tokens = rng.integers(0, ref.n_vocab, size=n).tolist()
            ref.logits(tokens)
            theirs, _ = timed(lambda: ref.logits(tokens), repeats)
            row: dict[str, Any] = {"llama_cpp": round(n / theirs, 1)}
            for layout, m in models.items():
                batch = jnp.asarray([tokens], jnp.int32)
                jax.block_until_ready(forward_jit(m.params, batch, m.config))
                ours, _ = timed(lambda: jax.block_until_ready(forward_jit(m.params, batch, m.config)), repeats)
                row[layout] = round(n / ours, 1)
                row[f"{layout}_ratio"] = _ratio(n / ours, n / theirs)
            out[str(n)] = row
    return out


def _llama_decode(ref: Any, prompts: list[list[int]], n_new: int) -> float:
    """llama.cpp greedy decoding of several sequences in one batch per step; total tokens/s."""
    ref.clear()
    lengths = [len(p) for p in prompts]
    ref.decode([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
               [s for s, p in enumerate(prompts) for _ in p], [i == len(p) - 1 for p in prompts for i in range(len(p))])
    ends = np.cumsum(lengths) - 1  # batch index of each prompt's last token
    last = [int(np.argmax(ref.output_logits(int(e)))) for e in ends]
    t = time.perf_counter()
    for step in range(n_new - 1):
        ref.decode(last, [n + step for n in lengths], range(len(prompts)), [True] * len(prompts))
        last = [int(np.argmax(ref.output_logits(s))) for s in range(len(prompts))]
    return len(prompts) * (n_new - 1) / (time.perf_counter() - t)


def bench_decode(models: dict, path: Path, repeats: int, threads: int, n_new: int) -> dict[str, Any]:
    from ..generation import Sampler, generate
    from ..reference import LlamaCpp

    greedy = Sampler(temperature=0.0)
    any_model = next(iter(models.values()))
    prompt = any_model.tokenizer.encode("The history of the printing press begins in the fifteenth century")
    rows = [prompt[: 4 + 2 * i] for i in range(8)]
    out: dict[str, Any] = {"new_tokens": n_new}
    with LlamaCpp(path, n_ctx=8 * 128, n_threads=threads, n_seq=8) as ref:
        _llama_decode(ref, [prompt], n_new)
        out["llama_cpp_batch1"] = round(statistics.median(_llama_decode(ref, [prompt], n_new) for _ in range(repeats)), 1)
        _llama_decode(ref, rows, n_new)
        out["llama_cpp_batch8_total"] = round(statistics.median(_llama_decode(ref, rows, n_new) for _ in range(repeats)), 1)
    for layout, m in models.items():
        for name, batch in (("batch1", [prompt]), ("batch8_total", rows)):
            generate(m, batch, n_new, greedy, stop_at_eog=False)  # compile
            rate = statistics.median(generate(m, batch, n_new, greedy, stop_at_eog=False).decode_tok_s
                                     for _ in range(repeats))
            out[f"{layout}_{name}"] = round(rate, 1)
            out[f"{layout}_{name}_ratio"] = _ratio(rate, out[f"llama_cpp_{name}"])
    return out


def bench_fill(model: Any, repeats: int) -> dict[str, Any]:
    """Decode speed with `fill` tokens already in a cache sized for 4,352: the cost should follow
    the filled length, not the cache size."""
    from ..generation import Sampler, stream

    rng = np.random.default_rng(2)
    out: dict[str, Any] = {"cache_slots": 4352}

    def rate(prompt: list[int], n_new: int) -> float:
        t: dict[str, float] = {}
        for i, _ in enumerate(stream(model, prompt, n_new, Sampler(temperature=0.0), stop_at_eog=False, timings=t)):
            if i == 16:
                break
        return t["steps"] / t["decode_s"]

    for fill in (128, 1024, 4096):
        prompt = rng.integers(0, model.config.vocab_size, size=fill).tolist()
        n_new = 4352 - fill  # the same cache size for every fill
        rate(prompt, n_new)
        out[str(fill)] = round(statistics.median(rate(prompt, n_new) for _ in range(repeats)), 1)
    return out


def _child_rss(path: Path, what: str, layout: str, field: str = "peak_rss_mb") -> Any:
    """Peak RSS (MB) of a fresh process that only does `what` (see `_child_main`), or all it reports."""
    cmd = ["-m", "jaxllama.bench", "--child", what, "--weights", layout, "--model", str(path)]
    report = child_json(cmd, timeout=600)[0]
    return report if field == "all" else report[field]


def bench_memory(path: Path) -> dict[str, Any]:
    """Resident memory of a process that loads the model and greedily decodes 64 tokens (warm
    compilation cache): its whole-run peak (the load's included), its RSS after the load, and its
    peak while decoding (VmHWM restarted after the load), each next to a process that only
    imported jax (`baseline`); and llama-cpp-python's peak doing the same, over its RSS once imported
    (its mapped GGUF pages count as resident)."""
    out = {"gguf_mb": round(path.stat().st_size / 2**20, 1), "baseline_rss_mb": _child_rss(path, "baseline", "native")}
    for layout in LAYOUTS:
        _child_rss(path, "decode", layout)  # fill the compilation cache
        r = _child_rss(path, "decode", layout, "all")
        out[f"{layout}_decode"] = r
        out[f"{layout}_peak_over_baseline_mb"] = round(r["peak_rss_mb"] - out["baseline_rss_mb"], 1)
        if "decode_phase_peak_rss_mb" in r:
            out[f"{layout}_decode_phase_over_baseline_mb"] = round(r["decode_phase_peak_rss_mb"] - out["baseline_rss_mb"], 1)
    theirs = _child_rss(path, "llama_cpp_decode", "native", "all")
    out["llama_cpp_decode"] = theirs
    out["llama_cpp_peak_over_baseline_mb"] = round(theirs["peak_rss_mb"] - theirs["baseline_rss_mb"], 1)
    key = "native_decode_phase_over_baseline_mb" if "native_decode_phase_over_baseline_mb" in out else "native_peak_over_baseline_mb"
    out["native_decode_over_baseline_per_gguf"] = round(out[key] / out["gguf_mb"], 2)
    # over the GGUF's size, each a fresh process's peak over its own baseline (file pages included)
    gguf, base = out["gguf_mb"], out["baseline_rss_mb"]
    load = out["native_decode"]["load_peak_rss_mb"]
    ours_score = _child_rss(path, "score", "native", "all")
    theirs_score = _child_rss(path, "llama_cpp_score", "native", "all")
    out["scoring"] = {"ctx": ours_score["ctx"], "ours": ours_score, "llama_cpp": theirs_score}
    out["over_gguf"] = {
        "load_peak": round((load - base) / gguf, 2),
        "decode_peak": round(out["native_peak_over_baseline_mb"] / gguf, 2),
        "scoring_peak": round((ours_score["peak_rss_mb"] - base) / gguf, 2),
        "llama_cpp_decode_peak": round(out["llama_cpp_peak_over_baseline_mb"] / gguf, 2),
        "llama_cpp_scoring_peak": round((theirs_score["peak_rss_mb"] - theirs_score["baseline_rss_mb"]) / gguf, 2),
    }
    return out


SCORE_TEXT = "/usr/share/common-licenses/GPL-3"


def _score_text() -> str:
    """The memory section's scoring text: the GPL twice (over 4,096 tokens with any tokenizer here)."""
    return 2 * (Path(SCORE_TEXT).read_text() if Path(SCORE_TEXT).is_file() else CHAT * 400)


def bench_latency(path: Path, repeats: int) -> dict[str, Any]:
    """Process start to the first generated token (ours, warm caches) and to llama-cpp-python's
    whole 30-token chat answer (import, load, prompt, answer)."""
    ours_cmd = ["-m", "jaxllama", "generate", "--model", str(path), "--prompt", CHAT, "--chat",
                "--temperature", "0", "--max-new-tokens", "30"]
    theirs_code = (
        "import sys, llama_cpp\n"
        "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)\n"
        "out = llm.create_chat_completion([{'role': 'user', 'content': sys.argv[2]}], max_tokens=30, temperature=0)\n"
    )

    def first_token() -> float:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *ours_cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.read(1)  # the first byte of streamed text
        elapsed = time.perf_counter() - t
        proc.communicate()
        return elapsed

    def whole(cmd: list[str]) -> float:
        t = time.perf_counter()
        done = run_child(cmd)
        if done.returncode:
            raise RuntimeError(f"{cmd[:3]} failed: {done.stderr.strip().splitlines()[-1:]}")
        return time.perf_counter() - t

    first_token()  # fill the compilation cache
    ours = statistics.median(first_token() for _ in range(repeats))
    ours_whole = statistics.median(whole(ours_cmd) for _ in range(repeats))
    theirs = statistics.median(whole(["-c", theirs_code, str(path), CHAT]) for _ in range(repeats))
    return {"jaxllama_first_token_s": round(ours, 2), "jaxllama_whole_answer_s": round(ours_whole, 2),
            "llama_cpp_whole_answer_s": round(theirs, 2), "ratio_first_token_to_llama_cpp": round(ours / theirs, 2)}


def bench_tracing(model: Any, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ..model import forward_jit
    from ..tracing.probes import RECEIVERS, ProbeSpec

    rng, out = np.random.default_rng(1), {}
    sink = lambda layer, stats, positions, valid: None  # noqa: E731
    RECEIVERS.push(sink)
    try:
        for n in (128, 512):
            batch = jnp.asarray([rng.integers(0, model.config.vocab_size, size=n).tolist()], jnp.int32)
            spec = ProbeSpec(stats=model.config.probe_order)

            def traced() -> None:
                jax.block_until_ready(forward_jit(model.params, batch, model.config, probes=spec))
                jax.effects_barrier()

            def plain() -> None:
                jax.block_until_ready(forward_jit(model.params, batch, model.config))

            traced(), plain()
            on, _ = timed(traced, repeats)
            off, _ = timed(plain, repeats)
            out[str(n)] = {"off_s": round(off, 4), "all_probes_s": round(on, 4), "ratio": round(on / off, 3)}
    finally:
        RECEIVERS.remove(sink)
    return out


def bench_patching(model: Any, repeats: int) -> dict[str, Any]:
    """A patching sweep (`l_out`, every layer x position of a 16-token prompt pair differing at
    position 8) as `patch_sweep` runs it (16 cells per forward, resumed at the patched layer, the
    cells before position 8 known without running), against the cells one by one, each a whole
    forward (what a loop over `interventions.patch` computes, without its recompiling); and each
    saving alone; and attribution patching's estimate of the same grid (its time and its rank
    correlation with the real grid). Compiled before timing."""
    from ..analysis import attribution_sweep, patch_sweep, rank_correlation

    rng = np.random.default_rng(2)
    clean = rng.integers(0, model.config.vocab_size, size=16).tolist()
    corrupted = [*clean[:8], int(rng.integers(0, model.config.vocab_size)), *clean[9:]]
    answer, wrong = 1, 2
    out = {"cells": model.config.n_layer * len(clean)}
    runs = (("sweep_s", 16, True, True), ("one_by_one_s", 1, False, False),
            ("one_by_one_resumed_s", 1, True, False), ("batched_16_s", 16, False, False),
            ("batched_16_resumed_s", 16, True, False))
    for name, batch, resume, skip in runs:
        sweep = lambda: patch_sweep(model, clean, corrupted, answer, wrong, batch=batch, resume=resume,  # noqa: E731
                                    skip_unchanged=skip)
        sweep()  # compile
        out[name] = round(statistics.median(sweep().seconds for _ in range(repeats)), 3)
    out["speedup"] = round(out["one_by_one_s"] / out["sweep_s"], 2)
    # attribution patching: the same grid to first order, one forward and one backward
    attribution = lambda: attribution_sweep(model, clean, corrupted, answer, wrong)  # noqa: E731
    attribution()  # compile
    out["attribution_s"] = round(statistics.median(attribution().seconds for _ in range(repeats)), 3)
    # how well it ranks the cells, on a factual-recall pair (where the tokenizer gives equal lengths)
    tok = model.tokenizer
    a, b = tok.encode("The Eiffel Tower is in the city of"), tok.encode("The Colosseum is in the city of")
    paris, rome = tok.encode(" Paris", add_special=False), tok.encode(" Rome", add_special=False)
    out["attribution_rank_correlation"] = None
    if len(a) == len(b):
        est = attribution_sweep(model, a, b, paris[0], rome[0])
        real = patch_sweep(model, a, b, paris[0], rome[0])
        out["attribution_rank_correlation"] = round(rank_correlation(est.grid, real.grid), 3)
    return out


def bench_tokenize(model: Any, path: Path, repeats: int) -> dict[str, Any]:
    from ..reference import LlamaCpp

    text = (Path(__file__).resolve().parent / "model.py").read_text()
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    tok = model.tokenizer
    ours, _ = timed(lambda: tok.encode(text, add_special=False), repeats)
    with LlamaCpp(path, n_ctx=16) as ref:
        theirs, _ = timed(lambda: ref.tokenize(text), repeats)
    return {"jaxllama_s": round(ours, 3), "llama_cpp_s": round(theirs, 3), "ratio": _ratio(theirs, ours)}


def _child_main(what: str, layout: str, path: Path) -> None:
    """One isolated measurement in this process; prints its peak RSS as JSON."""
    if what == "llama_cpp_score":  # llama.cpp's perplexity over 2 chunks of ctx min(2048, context)
        from ..gguf.config import LlamaConfig
        from ..gguf.reader import read_gguf
        from ..scoring.llamacpp import llamacpp_perplexity

        ctx = min(2048, LlamaConfig.from_gguf(read_gguf(path)).context_length)
        base = peak_rss_mb("VmRSS")
        llamacpp_perplexity(path, _score_text(), ctx, chunks=2, n_seq=1)
        print(json.dumps({"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base, "ctx": ctx}))
        return
    if what == "llama_cpp_decode":  # llama-cpp-python: RSS once imported, then the peak of a 64-token answer
        import llama_cpp

        base = peak_rss_mb("VmRSS")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
        llm("The history of the printing press", max_tokens=64, temperature=0)
        print(json.dumps({"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": base}))
        return
    import jax

    import jaxllama

    jax.numpy.zeros(1).block_until_ready()
    out: dict[str, float] = {}
    if what == "score":  # perplexity over 2 chunks of ctx min(2048, context), as a user runs it
        from ..scoring import perplexity

        model = jaxllama.load(path, weights=layout)
        ctx = min(2048, model.config.context_length)
        out["after_load_rss_mb"] = peak_rss_mb("VmRSS")
        perplexity(model, _score_text(), ctx=ctx, chunks=2)
        out["ctx"] = ctx
    if what in ("load", "decode"):
        model = jaxllama.load(path, weights=layout)
        jax.block_until_ready(model.params)
        if what == "decode":
            from ..generation import generate

            jaxllama.use_compilation_cache()  # warm caches, as a user's second run has them
            prompt = model.tokenizer.encode("The history of the printing press")
            out["after_load_rss_mb"], out["load_peak_rss_mb"] = peak_rss_mb("VmRSS"), peak_rss_mb()
            restarted = reset_peak_rss()
            generate(model, [prompt], 64, stop_at_eog=False)
            if restarted:
                out["decode_phase_peak_rss_mb"] = peak_rss_mb()
    whole = max(peak_rss_mb(), out.get("load_peak_rss_mb", 0.0))  # VmHWM may have restarted after the load
    print(json.dumps({"peak_rss_mb": whole, **out}))


def run(path: Path, sections: tuple[str, ...], repeats: int, threads: int, decode_tokens: int) -> dict[str, Any]:
    """Every requested section, as one JSON-ready dict."""
    import jaxllama

    r: dict[str, Any] = {"model": str(path), "machine": machine(), "threads": threads, "repeats": repeats,
                         "ratios": "ours / llama.cpp (throughput), llama.cpp / ours (time): > 1 means jaxllama is faster"}
    in_process = {"prefill", "decode", "fill", "tracing", "device", "tokenize", "patching"} & set(sections)
    models = {layout: jaxllama.load(path, weights=layout) for layout in LAYOUTS} if in_process else {}
    if models:
        r["kernels"] = kernel_table(models["native"])
    if "load" in sections:
        r["load"] = bench_load(path, repeats)
    if "prefill" in sections:
        r["prefill_tok_s"] = bench_prefill(models, path, repeats, threads)
    if "decode" in sections:
        r["decode_tok_s"] = bench_decode(models, path, repeats, threads, decode_tokens)
    if "fill" in sections:
        r["decode_tok_s_by_fill"] = bench_fill(models["native"], repeats)
    if "tracing" in sections:
        r["tracing"] = bench_tracing(models["native"], repeats)
    if "device" in sections:
        from .device import bench_device

        r["device"] = bench_device(models, repeats, decode_tokens)
    if "patching" in sections:
        r["patching"] = bench_patching(models["native"], repeats)
    if "quant" in sections:
        from .quant import bench_quant

        r["quant"] = bench_quant(path, repeats)
    if "sensitivity" in sections:
        from .quant import bench_sensitivity

        r["sensitivity"] = bench_sensitivity(path)
    if "tokenize" in sections:
        r["tokenize_1mb"] = bench_tokenize(models["native"], path, repeats)
    del models
    if "memory" in sections:
        r["memory"] = bench_memory(path)
    if "latency" in sections:
        r["latency"] = bench_latency(path, repeats)
    if "scoring" in sections:
        from .scoring import bench_scoring

        r["scoring"] = bench_scoring(path, repeats, threads)
    return r


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", metavar="PATH|NAME", help="GGUF file or known model name (default: the default model)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement; medians are reported (5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for llama.cpp (all cores)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decode measurement (64)")
    ap.add_argument("--only", help=f"comma-separated sections (default: all but device): {', '.join(SECTIONS)}")


MAX_DECODE_TOKENS = 4096  # a decode measurement's cache holds the prompt and these


def check_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """Every argument checked before any work (a bad one found after minutes of measuring is a
    waste); returns the sections to run."""
    from ..errors import InvalidInputError

    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.decode_tokens <= MAX_DECODE_TOKENS:
        raise InvalidInputError(f"--decode-tokens must be in 1..{MAX_DECODE_TOKENS}, got {args.decode_tokens}")
    return parse_sections(args.only)


def parse_sections(text: str | None) -> tuple[str, ...]:
    from ..errors import InvalidInputError

    if text is None:
        return DEFAULT_SECTIONS
    chosen = tuple(s.strip() for s in text.split(","))
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise InvalidInputError(f"--only: unknown section {bad[0]!r}; sections: {', '.join(SECTIONS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jaxllama bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="native", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from ..gguf.default_model import resolve_model

    path = resolve_model(args.model)
    if args.child:
        _child_main(args.child, args.weights, path)
        return 0
    print(json.dumps(run(path, check_arguments(args), args.repeats, args.threads, args.decode_tokens), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
