"""The `scoring` section of `jaxllama bench`: perplexity of a text next to llama.cpp's.

- whole run: `jaxllama perplexity --json` in a fresh process (interpreter start, imports, load,
  tokenizing, compilation, scoring) next to llama.cpp doing the same work on the same file and
  thread count (`jaxllama.scoring.llamacpp_perplexity`: llama-perplexity's batching, n_seq chunks
  per decode), with llama.cpp's default settings (F16 KV cache, flash attention auto) and with the
  bit-close ones (F32 KV cache, flash attention off). llama.cpp's time starts at loading the model:
  its process's Python and jax imports are not counted against it.
- steady state: tokens through the model per second (and scored tokens per second), compilation
  excluded, from the same runs.
- memory: peak RSS of a fresh process scoring one row of 1,024 and 8,192 tokens (`token_logprobs`),
  and its growth over the RSS after loading.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .common import child_json

TEXT = "/usr/share/common-licenses/GPL-3"

LLAMACPP = """
import json, sys
from jaxllama.scoring.llamacpp import llamacpp_perplexity
path, text, ctx, threads, bit_close = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3]), int(sys.argv[4]), \\
    sys.argv[5] == "1"
r = llamacpp_perplexity(path, text, ctx, None, threads, bit_close=bit_close)
print(json.dumps({"ppl": r.ppl, "n_tokens": r.n_tokens, "scored": int(r.nll.size), "tok_s": r.tok_s,
                  "wall_s": r.wall_s}))
"""

MEMORY = """
import json, sys
import numpy as np
import jaxllama
from jaxllama.bench import peak_rss_mb
from jaxllama.scoring import token_logprobs
model = jaxllama.load(sys.argv[1])
text, n = open(sys.argv[2]).read(), int(sys.argv[3])
ids = []
while len(ids) < n:  # the text, repeated as often as it takes
    ids += model.tokenizer.encode(text, add_special=False)
ids = ids[:n]
loaded = peak_rss_mb("VmRSS")
r = token_logprobs(model, ids, batch_size=1)
assert np.isfinite(r.logprobs[1:]).all()
print(json.dumps({"rss_after_load_mb": loaded, "peak_rss_mb": peak_rss_mb()}))
"""


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def bench_scoring(path: Path, repeats: int, threads: int, ctx: int = 512, text: str = TEXT,
                  memory_lengths: tuple[int, ...] = (1024, 8192)) -> dict[str, Any]:
    """Perplexity of `text` at `ctx`: whole-run wall time and steady-state tokens/s, both sides."""
    r: dict[str, Any] = {"text": text, "ctx": ctx}
    cmd = ["-m", "jaxllama", "perplexity", "--model", str(path), "--file", text, "--ctx", str(ctx),
           "--json", "--quiet"]
    for layout in ("float32", "native"):  # the CLI's default for scoring first
        runs = [child_json(cmd + ["--weights", layout]) for _ in range(repeats)]
        ours = [o for o, _ in runs]
        scored = ours[0]["n_chunks"] * (ctx - 1 - ctx // 2)
        r[f"jaxllama_{layout}"] = {
            "ppl": ours[0]["ppl"], "n_tokens": ours[0]["n_tokens"], "scored": scored,
            "process_wall_s": _med([w for _, w in runs]), "compile_s": _med([o["compile_s"] for o in ours]),
            "tok_s": _med([o["tok_s"] for o in ours]), "scored_tok_s": _med([o["tok_s"] * scored / o["n_tokens"] for o in ours]),
            "runs_process_wall_s": [round(w, 3) for _, w in runs]}
    for name, bit_close in (("llama_cpp", "0"), ("llama_cpp_bit_close", "1")):
        theirs = [child_json(["-c", LLAMACPP, str(path), text, str(ctx), str(threads), bit_close])[0]
                  for _ in range(repeats)]
        r[name] = {"ppl": theirs[0]["ppl"], "wall_s_from_model_load": _med([x["wall_s"] for x in theirs]),
                   "tok_s": _med([x["tok_s"] for x in theirs]),
                   "runs_wall_s": [round(x["wall_s"], 3) for x in theirs]}
    lc = r["llama_cpp"]
    r["ratios_vs_llama_cpp_defaults"] = {
        layout: {"whole_run_wall_theirs_over_ours": round(lc["wall_s_from_model_load"] / r[f"jaxllama_{layout}"]["process_wall_s"], 3),
                 "steady_state_tok_s": round(r[f"jaxllama_{layout}"]["tok_s"] / lc["tok_s"], 3),
                 "ppl_relative_difference": r[f"jaxllama_{layout}"]["ppl"] / lc["ppl"] - 1}
        for layout in ("float32", "native")}
    mem = {}
    for n in memory_lengths:
        out, _ = child_json(["-c", MEMORY, str(path), text, str(n)])
        mem[str(n)] = {k: round(v, 1) for k, v in out.items()} | {
            "growth_mb": round(out["peak_rss_mb"] - out["rss_after_load_mb"], 1)}  # the peak may be the load's
    r["memory_one_row"] = mem
    return r
