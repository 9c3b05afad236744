"""The quantization lab end to end, for the closing note: a sensitivity sweep of an off-grid base,
mixes chosen at the sizes of llama-quantize's Q4_K_M and Q3_K_M recipes (made from the same base),
and all of them measured on a text the sweep did not see (jaxllama's KL against the base,
llama.cpp's perplexity). Prints one JSON object.

    python tools/quant_lab.py --base base.F32.gguf --sweep-text A.txt --eval-text B.txt --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import gguf

    from jaxllama.bench.common import machine
    from jaxllama.cli import main as cli
    from jaxllama.loader import load
    from jaxllama.reference.quantize import llama_quantize
    from jaxllama.scoring.kld import kl_divergence
    from jaxllama.scoring.llamacpp import llamacpp_perplexity
    from jaxllama.scoring.perplexity import read_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--sweep-text", required=True)
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--types", default="Q4_0,IQ4_NL,Q5_0,Q5_1,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--group", default="class")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--sweep-chunks", type=int, default=2)
    ap.add_argument("--eval-chunks", type=int, default=4)
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "base": a.base, "types": a.types, "group": a.group}
    t0 = time.perf_counter()
    sweep = out / "sweep.json"
    if not sweep.exists():
        rc = cli(["sensitivity", "--base", a.base, "--file", a.sweep_text, "--types", a.types, "--group", a.group,
                  "--ctx", str(a.ctx), "--chunks", str(a.sweep_chunks), "--out", str(sweep),
                  "--heatmap", str(out / "sweep.png")])
        assert rc == 0
    result["sweep_s"] = round(time.perf_counter() - t0, 1)
    s = json.loads(sweep.read_text())
    result["sweep_rank_correlation"] = s["rank_correlation"]
    files = {}
    for name, ftype in (("Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M), ("Q3_K_M", gguf.LlamaFileType.MOSTLY_Q3_K_M)):
        path = out / f"llama-{name}.gguf"
        if not path.exists():
            llama_quantize(a.base, path, int(ftype))
        files[f"llama.cpp {name}"] = path
        r = gguf.GGUFReader(path)
        nbytes = sum(int(t.n_bytes) for t in r.tensors)
        weights = sum(int(t.n_elements) for t in r.tensors)
        bpw = nbytes * 8 / weights
        mix = out / f"jaxllama-at-{name}.gguf"
        rc = cli(["quantize", "--base", a.base, "--budget", f"{bpw:.6f}", "--sweep", str(sweep), "--out", str(mix)])
        assert rc == 0
        files[f"jaxllama mix at {name} size"] = mix
    base = load(a.base, weights="float32")
    text = read_text(a.eval_text)
    rows = {}
    for label, path in files.items():
        r = gguf.GGUFReader(path)
        nbytes = sum(int(t.n_bytes) for t in r.tensors)
        weights = sum(int(t.n_elements) for t in r.tensors)
        kl = kl_divergence(base, load(path), text, a.ctx, a.eval_chunks)
        ppl = llamacpp_perplexity(path, text, a.ctx, a.eval_chunks)
        rows[label] = {"file_mb": round(path.stat().st_size / 1e6, 2), "bpw": round(nbytes * 8 / weights, 4),
                       "kld_mean": kl.summary["kld_mean"], "kld_p99": kl.summary["kld_percentiles"]["99"],
                       "same_top": kl.summary["same_top_rate"], "llama_cpp_ppl": ppl.ppl,
                       "types": dict(sorted({t.tensor_type.name: 0 for t in r.tensors}.items()))}
        for t in r.tensors:
            rows[label]["types"][t.tensor_type.name] += 1
    base_ppl = llamacpp_perplexity(a.base, text, a.ctx, a.eval_chunks)
    result["base_llama_cpp_ppl"] = base_ppl.ppl
    result["files"] = rows
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
