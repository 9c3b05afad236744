"""Benchmark scoring next to llama.cpp on one GGUF and one text; prints one JSON object.

    .venv/bin/python tools/bench_scoring.py [--model PATH] [--file TEXT] [--ctx 512] [--repeats 3] [--threads N]

- perplexity, whole run: `jaxllama perplexity --json` in a fresh process (interpreter start, imports,
  load, tokenizing, compilation, scoring), next to llama.cpp doing the same work on the same file and
  thread count (`jaxllama.scoring.llamacpp_perplexity`: llama-perplexity's batching, n_seq chunks per
  decode, with llama.cpp's default settings (F16 KV cache, flash attention auto) and, separately,
  the bit-close ones (F32 KV cache, flash attention off)). llama.cpp's wall time starts at loading
  the model: its process's Python and jax imports are not counted against it.
- steady state: tokens run through the model per second (and scored tokens per second), compilation
  excluded, from the same runs.
- memory: peak RSS of a fresh process scoring one row of 1,024 ... 8,192 tokens (`token_logprobs`),
  and its growth over the RSS after loading.
Timings are medians of `--repeats` runs. The CPU model, instruction sets and load average are printed
with the numbers: compare only ratios measured in one run (machines of this kind differ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile")

LLAMACPP = """
import json, sys, time
from jaxllama.scoring.llamacpp import llamacpp_perplexity
path, text, ctx, chunks, threads, bit_close = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3]), \\
    (int(sys.argv[4]) or None), int(sys.argv[5]), sys.argv[6] == "1"
r = llamacpp_perplexity(path, text, ctx, chunks, threads, bit_close=bit_close)
print(json.dumps({"ppl": r.ppl, "ppl_err": r.ppl_err, "n_tokens": r.n_tokens, "scored": int(r.nll.size),
                  "tok_s": r.tok_s, "wall_s": r.wall_s}))
"""

MEMORY = """
import json, resource, sys
import numpy as np
import jaxllama
from jaxllama.scoring import token_logprobs
model = jaxllama.load(sys.argv[1])
text, n = open(sys.argv[2]).read(), int(sys.argv[3])
ids = []
while len(ids) < n:  # the text, repeated as often as it takes
    ids += model.tokenizer.encode(text, add_special=False)
ids = ids[:n]
import time
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = token_logprobs(model, ids, batch_size=1)
s = time.perf_counter() - t
assert np.isfinite(r.logprobs[1:]).all()
print(json.dumps({"tokens": len(ids), "rss_after_load_mb": rss_loaded / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "first_call_s": s}))
"""


def cpu() -> dict:
    info = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        info |= {"model": model, "instruction_sets": [f for f in FLAGS if f in flags]}
    except (OSError, StopIteration):
        info["model"] = platform.processor()
    return info


def child(args: list[str], env: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"benchmark child failed: {' '.join(args[:4])}...\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the default model)")
    ap.add_argument("--file", default="/usr/share/common-licenses/GPL-3", help="UTF-8 text (default: GPL-3)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0, help="0: every chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--memory-lengths", default="1024,2048,4096,8192")
    ap.add_argument("--skip-bit-close", action="store_true", help="skip llama.cpp with the bit-close settings")
    args = ap.parse_args()

    from jaxllama.gguf.default_model import default_model_path

    model = args.model or str(default_model_path())
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r: dict = {"model": model, "file": args.file, "ctx": args.ctx, "threads": args.threads, "repeats": args.repeats,
               "cpu": cpu(), "load_average_start": os.getloadavg()}

    ours, walls = [], []
    cmd = [sys.executable, "-m", "jaxllama", "perplexity", "--model", model, "--file", args.file, "--ctx",
           str(args.ctx), "--json", "--quiet"] + (["--chunks", str(args.chunks)] if args.chunks else [])
    for _ in range(args.repeats):
        out, wall = child(cmd, env)
        ours.append(out)
        walls.append(wall)
    scored = ours[0]["n_chunks"] * (args.ctx - 1 - args.ctx // 2)
    r["jaxllama"] = {
        "ppl": ours[0]["ppl"], "ppl_err": ours[0]["ppl_err"], "n_tokens": ours[0]["n_tokens"], "scored": scored,
        "batch": ours[0]["reproduce"]["settings"]["batch_used"],
        "process_wall_s": med(walls), "command_wall_s": med([o["wall_s"] for o in ours]),
        "compile_s": med([o["compile_s"] for o in ours]), "tok_s": med([o["tok_s"] for o in ours]),
        "scored_tok_s": med([o["tok_s"] * scored / o["n_tokens"] for o in ours]),
        "runs_process_wall_s": [round(w, 3) for w in walls],
    }
    settings = [("llama_cpp", "0")] + ([] if args.skip_bit_close else [("llama_cpp_bit_close", "1")])
    for name, bit_close in settings:
        runs = [child([sys.executable, "-c", LLAMACPP, model, args.file, str(args.ctx), str(args.chunks),
                       str(args.threads), bit_close], env)[0] for _ in range(args.repeats)]
        r[name] = {"ppl": runs[0]["ppl"], "ppl_err": runs[0]["ppl_err"], "n_tokens": runs[0]["n_tokens"],
                   "wall_s_from_model_load": med([x["wall_s"] for x in runs]), "tok_s": med([x["tok_s"] for x in runs]),
                   "scored_tok_s": med([x["tok_s"] * x["scored"] / x["n_tokens"] for x in runs]),
                   "runs_wall_s": [round(x["wall_s"], 3) for x in runs]}
    lc = r["llama_cpp"]
    r["ratios_vs_llama_cpp_defaults"] = {
        "whole_run_wall": round(r["jaxllama"]["process_wall_s"] / lc["wall_s_from_model_load"], 3),
        "steady_state_tok_s": round(r["jaxllama"]["tok_s"] / lc["tok_s"], 3),
        "ppl_relative_difference": r["jaxllama"]["ppl"] / lc["ppl"] - 1,
    }

    mem = {}
    for n in [int(x) for x in args.memory_lengths.split(",")]:
        out, wall = child([sys.executable, "-c", MEMORY, model, args.file, str(n)], env)
        mem[str(n)] = {k: round(v, 1) for k, v in out.items() if k != "tokens"} | {"process_wall_s": round(wall, 2)}
    r["memory_one_row"] = mem
    lengths = sorted(mem, key=int)
    if len(lengths) > 1:
        lo, hi = mem[lengths[0]], mem[lengths[-1]]
        r["memory_growth_mb"] = {
            f"peak_{lengths[0]}_to_{lengths[-1]}": round(hi["peak_rss_mb"] - lo["peak_rss_mb"], 1),
            f"scoring_{lengths[0]}": round(lo["peak_rss_mb"] - lo["rss_after_load_mb"], 1),
            f"scoring_{lengths[-1]}": round(hi["peak_rss_mb"] - hi["rss_after_load_mb"], 1),
        }
    r["load_average_end"] = os.getloadavg()
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
