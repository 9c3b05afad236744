"""`jaxllama quantize` (a GGUF quantized as llama-quantize --pure writes it) and `jaxllama imatrix`
(llama.cpp's importance matrix, in its GGUF format)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InvalidInputError


def add_parsers(sub: Any, model_arg: Callable, act_quant_arg: Callable) -> None:
    q = sub.add_parser("quantize", help="quantize an F32/F16/BF16 GGUF as llama-quantize does (same bytes), "
                       "or to a size budget from a sensitivity sweep")
    q.add_argument("--base", required=True, metavar="GGUF", help="the F32, F16 or BF16 model to quantize")
    q.add_argument("--type", metavar="TYPE",
                   help="Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or IQ4_NL (with --pure)")
    q.add_argument("--pure", action="store_true",
                   help="every matrix to TYPE (llama-quantize --pure; rows that do not fill a K-quant's "
                        "256-value block fall back as llama.cpp's do)")
    q.add_argument("--budget", metavar="BPW", help="bits per weight (4.8 or 4.8bpw, as llama-quantize counts them): "
                   "a type per group chosen from a sensitivity sweep to minimise KL within the size")
    q.add_argument("--sweep", metavar="JSON", help="with --budget: a `jaxllama sensitivity --out` result of this base")
    q.add_argument("--file", metavar="TEXT", help="with --budget and no --sweep: run the sweep on this text")
    q.add_argument("--group", default="tensor", choices=("layer", "tensor", "class"), help="sweep groups (tensor)")
    q.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0", metavar="T1,T2,...",
                   help="candidate types of the sweep (Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0)")
    q.add_argument("--ctx", type=int, default=512, metavar="N", help="sweep and --eval chunk size (512)")
    q.add_argument("--chunks", type=int, metavar="K", help="sweep and --eval: the first K chunks only")
    q.add_argument("--eval", metavar="TEXT", help="then measure the written file: KL against the base (jaxllama) "
                   "and llama.cpp's own perplexity of it, on this text")
    q.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama.cpp's GGUF or legacy .dat)")
    q.add_argument("--out", required=True, metavar="GGUF", help="output file (written whole or not at all)")
    q.add_argument("--json", action="store_true", help="print one JSON summary (types, bytes, bpw, hashes)")
    im = sub.add_parser("imatrix", help="llama.cpp's importance matrix of a text, in its GGUF format")
    model_arg(im)
    im.add_argument("--file", required=True, metavar="TEXT", help="UTF-8 calibration text")
    im.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (512, as llama-imatrix)")
    im.add_argument("--chunks", type=int, metavar="K", help="use only the first K chunks (default: all)")
    im.add_argument("--batch", type=int, default=1, metavar="B", help="chunks per jitted forward (1)")
    im.add_argument("--process-output", action="store_true", help="also collect output.weight (as llama-imatrix)")
    im.add_argument("--out", default="imatrix.gguf", metavar="FILE", help="output file (imatrix.gguf)")
    im.add_argument("--weights", "--dtype", dest="weights", default="auto",
                    choices=("auto", "native", "float32", "bfloat16"), help="weight layout (auto: GGUF's blocks)")
    act_quant_arg(im)
    im.add_argument("--json", action="store_true", help="print a JSON summary with a reproduce block")


def _out_path(text: str, what: str = "--out") -> Path:
    out = Path(text)
    if not out.parent.is_dir():
        raise InvalidInputError(f"{what}: directory {out.parent} does not exist")
    if out.is_dir():
        raise InvalidInputError(f"{what}: {out} is a directory")
    return out


def cmd_quantize(args: argparse.Namespace) -> int:
    from gguf import GGUFReader

    from ..gguf.default_model import sha256_file
    from ..quant import parse_type
    from ..quant.file import quantize_file
    from ..quant.imatrix import read_imatrix

    if args.budget is None:
        if args.type is None or not args.pure:
            raise InvalidInputError("quantize: give --type TYPE --pure (every matrix to TYPE) or --budget BPW; "
                                    "llama-quantize's mixed recipes (Q4_K_M, ...) are not reproduced")
        qtype = parse_type(args.type, "--type")
    else:
        if args.type or args.pure:
            raise InvalidInputError("quantize: --budget chooses the types itself; drop --type/--pure")
        if not (args.sweep or args.file):
            raise InvalidInputError("quantize --budget needs --sweep JSON or --file TEXT to measure the sweep on")
    base, out = Path(args.base), _out_path(args.out)
    if not base.is_file():
        raise InvalidInputError(f"--base: {base}: no such file")
    if out.resolve() == base.resolve():
        raise InvalidInputError("--out must not be the --base file")
    try:
        reader = GGUFReader(base)
    except Exception as e:
        raise InvalidInputError(f"--base: {base}: not a readable GGUF file ({e})") from None
    weights, meta = None, {}
    if args.imatrix:
        im = read_imatrix(args.imatrix)
        im.check_for({t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2})
        weights = im.weights()
        meta = {"quantize.imatrix.file": str(args.imatrix), "quantize.imatrix.entries_count": len(weights),
                "quantize.imatrix.chunks_count": int(im.chunk_count)}
        if im.datasets:
            meta["quantize.imatrix.dataset"] = im.datasets[0]
    t0 = time.perf_counter()
    chosen, plan = None, {}
    if args.budget is not None:
        chosen, plan = _budget_mix(args, base, reader, weights)
        qtype = parse_type(max(chosen["bytes_by_type"], key=chosen["bytes_by_type"].get))
    res = quantize_file(base, out, qtype, imatrix=weights, types=plan or None, metadata=meta)
    seconds = time.perf_counter() - t0
    types = Counter(t.type.name for t in res.tensors)
    summary = {"out": str(out), "type": None if chosen else qtype.name, "pure": bool(args.pure),
               "file_type": res.file_type, "tensors": {t.name: t.type.name for t in res.tensors}, "types": dict(types),
               "tensor_bytes": res.nbytes, "weights": res.n_weights, "bpw": res.bpw, "imatrix": args.imatrix,
               "with_imatrix": sum(t.imatrix for t in res.tensors), "seconds": seconds,
               "base": {"path": str(base), "sha256": sha256_file(base)}, "out_sha256": sha256_file(out)}
    if chosen:
        summary["budget"] = chosen
    if args.eval:
        summary["eval"] = _evaluate(base, out, args)
    if args.json:
        print(json.dumps(summary))
    else:
        mix = ", ".join(f"{n} {k}" for k, n in types.most_common())
        print(f"{out}: {len(res.tensors)} tensors ({mix}), {res.nbytes / 2**20:.2f} MiB, {res.bpw:.3f} bpw, "
              f"{seconds:.1f} s", file=sys.stderr)
        if "eval" in summary:
            e = summary["eval"]
            print(f"measured on {args.eval}: KL {e['kld_mean']:.5f} (p99 {e['kld_p99']:.4f}, top-1 {e['same_top']:.3f}); "
                  f"llama.cpp perplexity {e['llama_cpp_ppl']:.4f}", file=sys.stderr)
    return 0


def _budget_mix(args: argparse.Namespace, base: Path, reader: Any, weights: Any) -> tuple[dict, dict]:
    """The sweep (read or run), the knapsack's choice per group, and the per-tensor types."""
    from ..gguf.default_model import sha256_file
    from ..loader import load
    from ..quant import parse_type
    from ..quant.budget import choose, options_from_sweep, parse_budget
    from ..quant.file import allows_quantization
    from ..quant.sensitivity import group_tensors, sensitivity
    from ..scoring.perplexity import read_text

    bpw = parse_budget(args.budget)
    if args.sweep:
        try:
            sweep = json.loads(Path(args.sweep).read_text())
            swept_sha = sweep["reproduce"]["model"]["sha256"]
            sweep["cells"], sweep["group"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"--sweep {args.sweep}: not a `jaxllama sensitivity --out` file ({e})") from None
        if swept_sha != sha256_file(base):
            raise InvalidInputError(f"--sweep {args.sweep}: measured on another model (sha256 {swept_sha[:12]}...)")
    else:
        model = load(base, weights="float32")
        types = [parse_type(t, "--types").name for t in args.types.split(",") if t.strip()]
        sweep = sensitivity(model, read_text(args.file), types, args.group, args.ctx, args.chunks,
                            imatrix=weights).to_json()
        del model
    n_weights = sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors)
    fixed = sum(int(t.n_bytes) for t in reader.tensors if not allows_quantization(t.name, len(t.shape)))
    capacity = int(bpw * n_weights / 8) - fixed
    options = options_from_sweep(sweep)
    names = [t.name for t in reader.tensors if allows_quantization(t.name, len(t.shape))]
    groups = group_tensors(names, sweep["group"])
    if set(groups) != set(options):
        raise InvalidInputError(f"--sweep {args.sweep}: its groups do not cover this model's tensors")
    try:
        pick = choose(options, capacity)
    except InvalidInputError as e:
        smallest = fixed + sum(min(b for _, b, _ in o) for o in options.values())
        raise InvalidInputError(f"--budget {args.budget}: {e}; the smallest mix is {smallest * 8 / n_weights:.3f} bpw") \
            from None
    plan = {n: parse_type(pick[g]) for g, members in groups.items() for n in members}
    by_type: dict[str, int] = {}
    kl = 0.0
    for g, t in pick.items():
        b, k = next((b, k) for tt, b, k in options[g] if tt == t)
        by_type[t] = by_type.get(t, 0) + b
        kl += k
    return {"bpw": bpw, "groups": pick, "predicted_kld_sum": kl, "bytes_by_type": by_type,
            "sweep": args.sweep or "(run here)", "group": sweep["group"]}, plan


def _evaluate(base: Path, out: Path, args: argparse.Namespace) -> dict:
    """KL(base || written file) by jaxllama and the written file's perplexity by llama.cpp."""
    from ..loader import load
    from ..scoring.kld import kl_divergence
    from ..scoring.llamacpp import llamacpp_perplexity
    from ..scoring.perplexity import read_text

    text = read_text(args.eval)
    kl = kl_divergence(load(base, weights="float32"), load(out), text, args.ctx, args.chunks)
    ppl = llamacpp_perplexity(out, text, args.ctx, args.chunks)
    s = kl.summary
    return {"text": str(args.eval), "kld_mean": s["kld_mean"], "kld_p99": s["kld_percentiles"]["99"],
            "same_top": s["same_top_rate"], "llama_cpp_ppl": ppl.ppl, "llama_cpp_ppl_err": ppl.ppl_err}


def cmd_imatrix(args: argparse.Namespace, load_model: Callable) -> int:
    from ..provenance import provenance
    from ..quant.imatrix import chunks_of, compute_imatrix, write_imatrix
    from ..scoring.perplexity import read_text

    for name in ("ctx", "batch"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.ctx < 16:  # llama-imatrix ignores products of fewer than 16 rows
        raise InvalidInputError(f"--ctx must be >= 16 (llama.cpp skips smaller batches), got {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise InvalidInputError(f"--chunks must be >= 1, got {args.chunks}")
    out = _out_path(args.out)
    text = read_text(args.file)
    model = load_model(args)
    if args.ctx > model.config.context_length:
        raise InvalidInputError(f"--ctx {args.ctx} exceeds the model's context {model.config.context_length}")
    tok = model.tokenizer
    chunks = chunks_of(tok.encode(text, add_special=True), args.ctx, tok.bos_id if tok.add_bos else None, args.chunks)
    t0 = time.perf_counter()
    im = compute_imatrix(model, chunks, batch=args.batch, process_output=args.process_output, dataset=str(args.file))
    seconds = time.perf_counter() - t0
    write_imatrix(out, im)
    if args.json:
        print(json.dumps({"out": str(out), "entries": len(im.sums), "chunks": im.chunk_count, "ctx": im.chunk_size,
                          "tokens": int(chunks.size), "seconds": seconds,
                          "reproduce": provenance(model, None, file=str(args.file), ctx=args.ctx, chunks=args.chunks,
                                                  process_output=args.process_output)}))
    else:
        print(f"{out}: {len(im.sums)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens, {seconds:.1f} s",
              file=sys.stderr)
    return 0


def add_sensitivity_parser(sub: Any) -> None:
    s = sub.add_parser("sensitivity", help="KL of quantizing each group of tensors to each type, measured end to end")
    s.add_argument("--base", required=True, metavar="GGUF", help="F32/F16/BF16 model (off every grid: see tools/offgrid_base.py)")
    s.add_argument("--file", required=True, metavar="TEXT", help="UTF-8 text to measure on")
    s.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K", metavar="T1,T2,...",
                   help="candidate types (Q2_K,Q3_K,Q4_K,Q5_K,Q6_K); K-quants fall back as llama.cpp's do")
    s.add_argument("--group", default="layer", choices=("layer", "tensor", "class"),
                   help="quantize one layer, one matrix, or one kind of matrix across layers at a time")
    s.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk; positions N/2..N-2 scored (512)")
    s.add_argument("--chunks", type=int, metavar="K", help="only the first K chunks (default: all)")
    s.add_argument("--batch", type=int, default=2, metavar="B", help="chunks per forward (2)")
    s.add_argument("--imatrix", metavar="FILE", help="quantize with this importance matrix")
    s.add_argument("--seed", type=int, default=0, help="seed of the Fisher estimate's sampled targets (0)")
    s.add_argument("--out", metavar="JSON", help="write the full result (every cell, reproduce block) here")
    s.add_argument("--heatmap", metavar="PNG", help="layer x tensor class heatmap of KL per byte saved")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ..loader import load
    from ..provenance import provenance
    from ..quant.imatrix import read_imatrix
    from ..quant.sensitivity import plot_heatmap, quantizable, sensitivity
    from ..scoring.perplexity import read_text

    for name in ("ctx", "batch"):
        if getattr(args, name) < 1:
            raise InvalidInputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    base = Path(args.base)
    if not base.is_file():
        raise InvalidInputError(f"--base: {base}: no such file")
    out = _out_path(args.out) if args.out else None
    heat = _out_path(args.heatmap, "--heatmap") if args.heatmap else None
    types = [t for t in args.types.split(",") if t.strip()]
    text = read_text(args.file)
    model = load(base, weights="float32")
    weights = None
    if args.imatrix:
        im = read_imatrix(args.imatrix)
        im.check_for({n: s[-1] for n, s in quantizable(model).items()})
        weights = im.weights()
    bar = _progress(args)
    res = sensitivity(model, text, types, args.group, args.ctx, args.chunks, args.batch, weights, args.seed,
                      progress=bar)
    doc = {**res.to_json(), "reproduce": provenance(model, None, file=str(args.file), types=res.types,
                                                    group=args.group, ctx=args.ctx, chunks=args.chunks,
                                                    imatrix=args.imatrix, seed=args.seed)}
    if out:
        out.write_text(json.dumps(doc))
    if heat:
        plot_heatmap(res, str(heat))
    if args.json:
        print(json.dumps(doc))
    else:
        groups, kl = res.grid()
        print(f"{'group':<22}" + "".join(f"{t:>12}" for t in res.types))
        for g, row in zip(groups, kl):
            print(f"{g:<22}" + "".join(f"{v:12.5f}" for v in row))
        print(f"mean KL over {res.positions} positions; Fisher estimate rank correlation {res.rank_correlation:.3f}; "
              f"{res.seconds:.0f} s", file=sys.stderr)
    return 0


def _progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(what: str) -> None:
        print(f"\r{what:<40}", end="", file=sys.stderr, flush=True)

    return show
