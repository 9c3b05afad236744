"""How far jaxllama's residual stream is from llama.cpp's, layer by layer, with and without
`--act-quant`, on one text; prints JSON (a measurement for the notes, not a test).

    python tools/act_quant_growth.py [--model qwen2.5-0.5b] [--tokens 256]

Per layer: the relative error ||ours - llama.cpp|| / ||llama.cpp|| of `l_out` (the residual stream
after the layer) and of each quantized product's input, plain and emulated (README, "Activation
quantization", explains the growth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jaxllama  # noqa: E402
from jaxllama.bench import machine  # noqa: E402
from texts import licence_text  # noqa: E402

INPUTS = ("attn_norm", "kqv_out", "ffn_norm", "ffn_swiglu", "l_out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    model = jaxllama.load(a.model)
    ids = model.tokenizer.encode(licence_text())[: a.tokens]
    runs = {aq: jaxllama.compare(model, ids, act_quant=aq) for aq in (False, True)}
    layers = []
    for i in range(model.config.n_layer):
        row = {"layer": i}
        for aq, run in runs.items():
            rel = {d.probe: d.rel_err for d in run.diffs if d.layer == i and d.probe in INPUTS}
            row["emulated" if aq else "plain"] = {p: float(f"{rel[p]:.3g}") for p in INPUTS if p in rel}
        layers.append(row)
    out = {"machine": machine(), "model": str(model.source), "sha256": model.sha256, "tokens": len(ids),
           "layers": layers}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
