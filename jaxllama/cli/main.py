"""The `jaxllama` command line: the parser, error handling and the inspection commands
(info, logits, tokenize, trace, compare); generation lives in `cli.generate`, scoring
(perplexity, kl-divergence) in `cli.score`.

Every failure is one line on stderr and a non-zero exit: 2 for usage errors, 1 for bad
input or files; an unexpected internal error prints one line too (exit 3), with the
traceback only when JAXLLAMA_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .cache import add_parser as add_cache_parser, cmd_cache
from .circuits import add_parsers as add_circuit_parsers, cmd_attention, cmd_lens, cmd_lens_train, cmd_patch
from .quant import add_parsers as add_quant_parsers, add_sensitivity_parser, cmd_imatrix, cmd_quantize, cmd_sensitivity
from .steer import add_control_vector_args, add_parser as add_steer_parser, cmd_steer, with_control_vectors
from .generate import add_sampling_args, cmd_chat, cmd_generate
from .score import add_mesh_arg, add_score_parsers, cmd_kl_divergence, cmd_perplexity, mesh_of
from ..errors import InvalidInputError, JaxLlamaError
from ..gguf.convert import WEIGHTS as WEIGHT_CHOICES
from ..runner import use_compilation_cache
from ..tracing.probes import ALL_PROBES


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH|NAME", help="GGUF file, or a known model fetched once: smollm2-135m "
                   "(the default, SmolLM2-135M-Instruct Q4_1), qwen2.5-0.5b, gemma3-270m")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a file whose weights or block scales hold NaN/Inf (refused otherwise)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxllama", description="Run and inspect Llama-family GGUF models in JAX.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="summarise a GGUF file: architecture, sizes, tensor types, tokenizer")
    _model_arg(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")

    lg = sub.add_parser("logits", help="write the float32 logits [T, vocab] of exactly the given tokens")
    _model_arg(lg)
    lg.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,2,3 (no BOS is added)")
    lg.add_argument("--out", required=True, metavar="FILE.npy", help="where to write the .npy array")
    lg.add_argument("--weights", "--dtype", dest="weights", default="auto", choices=WEIGHT_CHOICES,
                    help="weight layout: auto/native keeps GGUF's blocks (exact, fastest), float32, bfloat16 (lossy)")
    add_mesh_arg(lg)
    _act_quant_arg(lg)
    add_control_vector_args(lg)
    tr = sub.add_parser("trace", help="statistics of every probe at every layer (rms, min, max, mean, NaN/Inf)")
    _model_arg(tr)
    _input_args(tr)
    tr.add_argument("--probes", help="comma-separated probe names (default: all the model has; llama.cpp's "
                                      f"tensor names): {', '.join(ALL_PROBES)}")
    tr.add_argument("--layers", help="layers to report, e.g. 0,1,5-7 (default: all)")
    tr.add_argument("--per-position", action="store_true", help="one record per token position")
    tr.add_argument("--json", action="store_true", help="print {\"records\": [...], \"reproduce\": {...}}")
    tr.add_argument("--plot", metavar="FILE.png", help="save a plot of rms across layers")
    add_mesh_arg(tr)
    _act_quant_arg(tr)
    add_control_vector_args(tr)

    cp = sub.add_parser("compare", help="compare every probe with llama.cpp's tensors; report the first divergence")
    _model_arg(cp)
    _input_args(cp)
    cp.add_argument("--reference", metavar="PATH", help="GGUF for llama.cpp (default: the same file)")
    cp.add_argument("--tol", default="1e-2", help="relative error beyond which a probe has parted (1e-2)")
    cp.add_argument("--act-quant", action="store_true", help="emulate llama.cpp's activation quantization")
    cp.add_argument("--layers", help="layers to show in the table, e.g. 0-2,29 (all are compared)")
    cp.add_argument("--json", action="store_true", help="print the full comparison as JSON")

    tk = sub.add_parser("tokenize", help="token ids and pieces of a text, exactly as llama.cpp tokenizes it")
    _model_arg(tk)
    tk.add_argument("--text", required=True, help="the text to tokenize")
    tk.add_argument("--parse-special", action="store_true", help="turn control-token text such as <|im_end|> into its id")
    tk.add_argument("--no-add-special", action="store_true", help="do not add BOS/EOS even if the model asks for them")
    tk.add_argument("--json", action="store_true", help='print {"tokens": [...]}')
    tk.add_argument("--chat", action="store_true",
                    help="render the model's chat template for one user message TEXT (with generation prompt), "
                         "then tokenize it with --parse-special")

    gen = sub.add_parser("generate", help="generate text (streamed), or one JSON object with --json")
    _model_arg(gen)
    _input_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print tokens, text, speeds and settings as JSON")
    add_mesh_arg(gen)
    _act_quant_arg(gen)
    add_control_vector_args(gen)

    chat = sub.add_parser("chat", help="an interactive conversation using the file's chat template")
    _model_arg(chat)
    chat.add_argument("--system", help="a system message to start the conversation")
    chat.add_argument("--weights", "--dtype", dest="weights", default="auto", choices=WEIGHT_CHOICES,
                    help="weight layout: auto/native keeps GGUF's blocks (exact, fastest), float32, bfloat16 (lossy)")
    add_sampling_args(chat)
    add_mesh_arg(chat)
    add_score_parsers(sub, _model_arg)
    add_cache_parser(sub)
    add_circuit_parsers(sub, _model_arg, _input_args)
    add_steer_parser(sub, _model_arg)
    add_quant_parsers(sub, _model_arg, _act_quant_arg)
    add_sensitivity_parser(sub)
    bench = sub.add_parser("bench", help="benchmark against llama.cpp on the same file; prints JSON")
    from ..bench import add_arguments

    add_arguments(bench)
    return ap


def _input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text to tokenize with the model's tokenizer")
    g.add_argument("--tokens", help="comma-separated token ids (no BOS added)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    p.add_argument("--weights", "--dtype", dest="weights", default="auto", choices=WEIGHT_CHOICES,
                    help="weight layout: auto/native keeps GGUF's blocks (exact, fastest), float32, bfloat16 (lossy)")


def parse_layers(text: str | None, n_layer: int, what: str = "--layers") -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7], each layer checked against `n_layer` before a range is
    expanded (so '0-1000000000' is an error, not a billion-element list); None stays None."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo_text, sep, hi_text = part.strip().partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if sep else int(lo_text)
        except ValueError:
            raise InvalidInputError(f"{what}: {part.strip()!r} is not a layer number or range like 5-7") from None
        if hi < lo:
            raise InvalidInputError(f"{what}: {part.strip()!r} is an empty range")
        for end in (lo, hi):
            if not 0 <= end < n_layer:
                raise InvalidInputError(f"{what}: layer {end} out of range; valid layers: 0..{n_layer - 1}")
        out.extend(range(lo, hi + 1))
    return out


def positive_float(text: str, what: str) -> float:
    """A finite number > 0 (argparse gives NaN and inf happily)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"{what} must be a finite number > 0, got {text!r}")
    return value


def _input_tokens(args: argparse.Namespace, model: Any) -> list[int]:
    if args.tokens is not None:
        if args.chat:
            raise InvalidInputError("--chat needs --prompt, not --tokens")
        return parse_token_list(args.tokens)
    tok = model.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        return tok.encode(text, add_special=True, parse_special=True)
    return tok.encode(args.prompt, add_special=True, parse_special=False)


def parse_token_list(text: str, what: str = "--tokens") -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; a clear error for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        raise InvalidInputError(f"{what}: empty token list")
    ids = []
    for p in parts:
        try:
            ids.append(int(p))
        except ValueError:
            raise InvalidInputError(f"{what}: {p!r} is not an integer token id") from None
    return ids


def _model_path(arg: str | None) -> Path:
    from ..gguf.default_model import resolve_model

    return resolve_model(arg)


def summarize(path: Path) -> dict[str, Any]:
    """What `jaxllama info` shows, as data."""
    from ..gguf.config import LlamaConfig
    from ..gguf.reader import read_gguf

    f = read_gguf(path)
    md = f.metadata
    types = Counter(t.type_name for t in f.tensors.values())
    n_params = sum(math.prod(t.shape) for t in f.tensors.values())
    out: dict[str, Any] = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "gguf_version": f.version,
        "architecture": f.architecture,
        "name": md.get("general.name"),
        "tensors": len(f.tensors),
        "parameters": n_params,
        "tensor_types": dict(types.most_common()),
    }
    try:
        out["config"] = LlamaConfig.from_gguf(f).to_dict()
        out["supported"] = True
    except JaxLlamaError as e:
        out["supported"] = False
        out["unsupported_reason"] = str(e).removeprefix(f"{path}: ")
    tokens = md.get("tokenizer.ggml.tokens")
    out["tokenizer"] = {
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if tokens is not None else None,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        "chat_template": "tokenizer.chat_template" in md,
    }
    return out


def _print_info(s: dict[str, Any]) -> None:
    rows = [
        ("file", s["file"]),
        ("size", f"{s['size_bytes']:,} bytes"),
        ("gguf version", s["gguf_version"]),
        ("architecture", s["architecture"]),
        ("name", s["name"]),
        ("tensors", f"{s['tensors']} ({s['parameters']:,} parameters)"),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in s["tensor_types"].items()) or "none (vocab-only file)"),
    ]
    if s["supported"]:
        c = s["config"]
        rows += [
            ("layers", c["n_layer"]),
            ("width", f"{c['d_model']} (feed-forward {c['d_ff']})"),
            ("heads", f"{c['n_head']} query, {c['n_head_kv']} key/value, size {c['head_dim']}"),
            ("rope", f"base {c['rope_base']:g}, dims {c['rope_dim']}, linear scale {c['rope_scale']:g}"
                     + (", rope_freqs" if c["has_rope_freqs"] else "")),
            ("rms eps", f"{c['rms_eps']:g}"),
            ("vocab", c["vocab_size"]),
            ("context", c["context_length"]),
            ("output", "tied to token_embd" if c["tied_output"] else "output.weight"),
        ]
    else:
        rows.append(("supported", f"no: {s['unsupported_reason']}"))
    t = s["tokenizer"]
    rows += [
        ("tokenizer", f"{t['model']} (pre {t['pre']}), {t['vocab_size']} tokens, bos {t['bos_token_id']}, "
                      f"eos {t['eos_token_id']}, add_bos {t['add_bos_token']}"),
        ("chat template", "present" if t["chat_template"] else "absent"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:  # metadata may hold invalid UTF-8 (kept as surrogate escapes): show it replaced
        print(f"{k:<{width}}  {v}".encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _cmd_info(args: argparse.Namespace) -> int:
    summary = summarize(_model_path(args.model))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_info(summary)
    return 0


def _cmd_logits(args: argparse.Namespace) -> int:
    import numpy as np

    tokens = parse_token_list(args.tokens)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInputError(f"--out: directory {out.parent} does not exist")
    model = _load_model(args)
    logits = model.logits(tokens)
    try:
        with open(out, "wb") as fh:  # np.save(path) would append ".npy" to a name without it
            np.save(fh, logits)
    except OSError as e:
        raise InvalidInputError(f"--out: cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}: float32 logits of shape {list(logits.shape)}", file=sys.stderr)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from ..tracing.probes import check_probe_names
    from ..provenance import provenance
    from ..tracing.recorder import JUMP, finite_or_none, trace

    probes = check_probe_names(p.strip() for p in args.probes.split(",")) if args.probes else None
    model = _load_model(args)
    layers = parse_layers(args.layers, model.config.n_layer)
    tokens = _input_tokens(args, model)
    with trace(probes=probes, layers=layers, per_position=args.per_position) as rec:
        model.logits(tokens)
    if args.plot:
        rec.plot(args.plot)
    if args.json:
        records = [{k: finite_or_none(v) if isinstance(v, float) else v for k, v in r.items()} for r in rec.sorted_records()]
        out = {"records": records, "reproduce": provenance(model, tokens, probes=probes, layers=layers)}
        print(json.dumps(out))
        return 0
    print(rec.table())
    bad = rec.nonfinite()
    if bad:
        print(f"!! NaN/Inf first at {bad[0]['probe']} layer {bad[0]['layer']}")
    print(f"{len(tokens)} tokens; {len(rec.jumps())} rms jumps over {JUMP:g}x between layers; "
          f"{'no NaN/Inf' if not bad else f'{len(bad)} probes with NaN/Inf'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..reference.compare import compare
    from ..provenance import provenance

    tol = positive_float(args.tol, "--tol")
    model = _load_model(args)
    layers = parse_layers(args.layers, model.config.n_layer)
    tokens = _input_tokens(args, model)
    if args.reference is not None and not Path(args.reference).is_file():
        raise InvalidInputError(f"--reference: {args.reference}: no such file")
    result = compare(model, tokens, reference=args.reference, tol=tol, act_quant=args.act_quant)
    if args.json:
        out = result.as_dict() | {"reproduce": provenance(model, tokens, tol=tol, act_quant=args.act_quant)}
        print(json.dumps(out))
        return 0 if result.ok else 1
    print(result.table(only_layers=layers))
    print(result.summary())
    return 0 if result.ok else 1


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from ..text.tokenizer import load_tokenizer

    tok = load_tokenizer(_model_path(args.model))
    text, parse_special = args.text, args.parse_special
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        parse_special = True
    ids = tok.encode(text, add_special=not args.no_add_special, parse_special=parse_special)
    if args.json:
        print(json.dumps({"tokens": ids}))
        return 0
    width = len(str(len(tok) - 1))
    for i in ids:
        piece = tok.token_to_piece(i).decode("utf-8", errors="replace")
        print(f"{i:>{width}}  {json.dumps(piece, ensure_ascii=False)}")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _act_quant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-quant", action="store_true",
                   help="emulate llama.cpp's activation quantization (its 8-bit inputs to quantized products)")


def _load_model(args: argparse.Namespace) -> Any:
    from ..loader import load

    model = load(_model_path(args.model), weights=args.weights, mesh=mesh_of(args),
                 allow_nonfinite=getattr(args, "allow_nonfinite", False))
    model = model.with_act_quant() if getattr(args, "act_quant", False) else model
    return with_control_vectors(model, args)


def _cmd_generate(args: argparse.Namespace) -> int:
    return cmd_generate(args, _load_model, _input_tokens)


def _cmd_chat(args: argparse.Namespace) -> int:
    return cmd_chat(args, _load_model)


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import check_arguments, run

    sections = check_arguments(args)
    result = run(_model_path(args.model), sections, args.repeats, args.threads, args.decode_tokens)
    print(json.dumps(result, indent=1))
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    return cmd_lens(args, _load_model, _input_tokens)


def _cmd_attention(args: argparse.Namespace) -> int:
    return cmd_attention(args, _load_model, _input_tokens, parse_layers)


def _cmd_lens_train(args: argparse.Namespace) -> int:
    return cmd_lens_train(args, _load_model)


def _cmd_patch(args: argparse.Namespace) -> int:
    return cmd_patch(args, _load_model)


COMMANDS = {"generate": _cmd_generate, "chat": _cmd_chat, "info": _cmd_info, "logits": _cmd_logits,
            "trace": _cmd_trace, "compare": _cmd_compare, "tokenize": _cmd_tokenize, "bench": _cmd_bench,
            "perplexity": cmd_perplexity, "kl-divergence": cmd_kl_divergence, "cache": cmd_cache,
            "lens": _cmd_lens, "lens-train": _cmd_lens_train, "attention": _cmd_attention, "patch": _cmd_patch,
            "steer": lambda args: cmd_steer(args, _load_model), "quantize": cmd_quantize,
            "imatrix": lambda args: cmd_imatrix(args, _load_model), "sensitivity": cmd_sensitivity}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["lens", "train"]:  # `jaxllama lens train ...` is the command lens-train
        argv = ["lens-train", *argv[2:]]
    args = _parser().parse_args(argv)
    use_compilation_cache()
    try:
        return COMMANDS[args.command](args)
    except JaxLlamaError as e:
        print(f"jaxllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxllama: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never show a traceback to a CLI user unless asked
        if os.environ.get("JAXLLAMA_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"jaxllama: internal error: {type(e).__name__}: {msg} (JAXLLAMA_DEBUG=1 shows details)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
