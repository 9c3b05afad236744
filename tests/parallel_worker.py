"""Run in a subprocess with simulated CPU devices (XLA_FLAGS set by the caller before jax starts):
compare a model sharded over each requested mesh with the same model on one device.

Usage: python parallel_worker.py JOB.json; prints one JSON object per mesh (key "DxM") with the
largest relative logits errors, tokens, perplexities, trace records and HLO findings. The test
decides what passes; this script only measures.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxllama  # noqa: E402
from jaxllama import parallel  # noqa: E402
from jaxllama.model import forward_capture_jit, forward_step, init_cache  # noqa: E402
from jaxllama.hlo import unfused  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the error relative to the reference's scale."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def records(model, rows) -> list[dict]:
    with jaxllama.trace(probes=["attn_norm", "ffn_out", "l_out", "result_output"]) as rec:
        model.logits_batch(rows)
    return rec.records


def compare_records(ref: list[dict], got: list[dict]) -> dict:
    key = lambda r: (r["call"], r["layer"], r["probe"], r["row"])  # noqa: E731
    counts = Counter(key(r) for r in got)
    ref_by = {key(r): r for r in ref}
    got_by = {key(r): r for r in got}
    worst = 0.0
    for k, r in ref_by.items():
        if k in got_by:
            for s in ("rms", "mean", "std", "min", "max", "absmax"):
                worst = max(worst, abs(got_by[k][s] - r[s]) / max(abs(r["rms"]), 1e-30))
    return {"n_ref": len(ref), "n_got": len(got), "max_count": max(counts.values()), "same_keys": set(ref_by) == set(got_by),
            "stat_rel": worst}


def hlo_full_copies(model, matrices: list[list[int]], n_tokens: int) -> list[str]:
    """Shapes of full-size split matrices (either order, with or without the layer axis) among
    the compiled forward's real buffers."""
    (tokens,) = parallel.put_rows(model.mesh, np.zeros((1, n_tokens), np.int32))
    text = unfused(forward_capture_jit.lower(model.params, tokens, model.config).compile().as_text())
    found = []
    for dims in matrices:
        for shape in {tuple(dims), tuple(dims[1:]), (dims[0], dims[2], dims[1]), (dims[2], dims[1])}:
            pat = r"\b(?:f32|s8|bf16)\[" + ",".join(map(str, shape)) + r"\]"
            found += re.findall(pat, text)
    return sorted(set(found))


def decode_kernel_calls(model) -> int:
    """jaxllama custom calls in the compiled one-token decode step of `model`."""
    step = jax.jit(forward_step, static_argnames=("config",))
    cache = init_cache(model.config, 1, 16)
    text = step.lower(model.params, jnp.zeros((1, 1), jnp.int32), cache, jnp.int32(3), jnp.zeros(1, jnp.int32),
                      model.config).compile().as_text()
    return text.count('custom_call_target="jaxllama_')


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    rng = np.random.default_rng(0)
    ref = jaxllama.load(job["path"], weights=job.get("weights", "auto"))
    vocab = ref.config.vocab_size
    one = rng.integers(0, vocab, job["t"]).tolist()
    ragged = [rng.integers(0, vocab, n).tolist() for n in job["ragged"]]
    ppl_ids = rng.integers(0, vocab, job["ppl_tokens"]).tolist()
    want = {"one": ref.logits(one), "batch": ref.logits_batch(ragged)}
    if job.get("generate"):
        want["gen"] = jaxllama.generate(ref, ragged, job["generate"], stop_at_eog=False).tokens
    want["ppl"] = jaxllama.perplexity(ref, ppl_ids, ctx=job["ctx"], batch_size=job.get("ppl_batch")).ppl
    if job.get("trace"):
        want["trace"] = records(ref, ragged)
    if job.get("hlo"):
        want["hlo"] = hlo_full_copies(ref, job["hlo"], job["t"])
    out = {"reference_hlo": want.get("hlo"), "logit_scale": float(np.max(np.abs(want["one"])))}
    for d, m in job["meshes"]:
        mesh = parallel.make_mesh(d, m)
        model = jaxllama.load(job["path"], weights=job.get("weights", "auto"), mesh=mesh, vocab=job.get("vocab", "split"))
        res: dict = {"one": rel(model.logits(one), want["one"]),
                     "batch": max(rel(a, b) for a, b in zip(model.logits_batch(ragged), want["batch"])),
                     "batch_rows": len(model.logits_batch(ragged))}
        full = [d, m] in job.get("full_on", job["meshes"])  # generation and trace only on these meshes
        if job.get("generate") and full:
            res["gen_same"] = jaxllama.generate(model, ragged, job["generate"], stop_at_eog=False).tokens == want["gen"]
        ppl = jaxllama.perplexity(model, ppl_ids, ctx=job["ctx"], batch_size=job.get("ppl_batch")).ppl
        res["ppl_rel"] = abs(ppl - want["ppl"]) / want["ppl"]
        if job.get("trace") and full:
            res["trace"] = compare_records(want["trace"], records(model, ragged))
        if job.get("hlo") and m > 1:
            res["hlo"] = hlo_full_copies(model, job["hlo"], job["t"])
        if full:  # the decode step on a mesh: no single-device CPU kernel (custom calls do not partition)
            res["kernel_calls"] = decode_kernel_calls(model)
        leaf = model.params["params"]["layers"]["ffn_gate"]
        res["ffn_gate_spec"] = str(jax.tree.leaves(leaf)[0].sharding.spec)
        out[f"{d}x{m}"] = res
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
