"""`jaxllama steer` (a control vector from prompt pairs, written as llama.cpp's GGUF) and the
`--control-vector FILE[:STRENGTH]` / `--control-vector-layer-range A B` options that apply such
files, as llama.cpp's `--control-vector-scaled` and `--control-vector-layer-range` do."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidInputError


def add_control_vector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-vector", action="append", metavar="FILE[:STRENGTH]", default=None,
                   help="add a llama.cpp control vector (GGUF) to every layer's output, times STRENGTH (1); "
                        "repeatable: the files are summed, as llama.cpp's --control-vector-scaled")
    p.add_argument("--control-vector-layer-range", nargs=2, type=int, metavar=("START", "END"),
                   help="layers (inclusive) the control vectors act on (default: 1 to the last, as llama.cpp)")


def parse_control_vector(text: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' -> (path, strength); a bad strength is bad input."""
    path, sep, tail = text.rpartition(":")
    if not sep or Path(text).is_file():
        path, tail = text, "1"
    try:
        strength = float(tail)
    except ValueError:
        raise InvalidInputError(f"--control-vector {text}: strength {tail!r} is not a number") from None
    if not math.isfinite(strength):
        raise InvalidInputError(f"--control-vector {text}: strength must be finite, not {tail}")
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"--control-vector: {p}: no such file")
    return p, strength


def with_control_vectors(model: Any, args: argparse.Namespace) -> Any:
    """`model` with the command line's control vectors, if any."""
    from ..gguf.control_vector import combine, read_control_vector

    files = getattr(args, "control_vector", None)
    layer_range = getattr(args, "control_vector_layer_range", None)
    if not files:
        if layer_range is not None:
            raise InvalidInputError("--control-vector-layer-range needs --control-vector")
        return model
    pairs = [parse_control_vector(f) for f in files]
    cv = combine([(read_control_vector(p), s) for p, s in pairs])
    return model.with_control_vector(cv, None if layer_range is None else tuple(layer_range))


def add_parser(sub: Any, model_arg: Callable) -> None:
    st = sub.add_parser("steer", help="a steering vector from prompt pairs, written as a llama.cpp control vector")
    model_arg(st)
    st.add_argument("--positive", required=True, metavar="FILE", help="positive prompts, one per line")
    st.add_argument("--negative", required=True, metavar="FILE", help="negative prompts, one per line (as many)")
    st.add_argument("--out", required=True, metavar="FILE.gguf", help="where to write the control vector")
    st.add_argument("--method", default="mean", choices=("mean", "pca"),
                    help="mean difference, or its first principal direction (as cvector-generator --method)")
    st.add_argument("--positions", default="all", choices=("all", "last"),
                    help="every position of each pair, padded with ' ' (cvector-generator), or the last token")
    st.add_argument("--weights", "--dtype", dest="weights", default="auto",
                    choices=("auto", "native", "float32", "bfloat16"), help="weight layout (auto: GGUF's blocks)")
    st.add_argument("--json", action="store_true", help="print the per-layer sample counts and a reproduce block")


def read_prompts(path: str, what: str) -> list[str]:
    """One prompt per non-empty line, with \\n, \\t, \\\\ and \\" escapes, as cvector-generator reads them."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{what}: {p}: cannot be read as UTF-8 text ({e})") from None
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}
    out = []
    for line in text.splitlines():
        if not line:
            continue
        chars, i = [], 0
        while i < len(line):
            if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in escapes:
                chars.append(escapes[line[i + 1]])
                i += 2
            else:
                chars.append(line[i])
                i += 1
        out.append("".join(chars))
    if not out:
        raise InvalidInputError(f"{what}: {p}: no prompts")
    return out


def cmd_steer(args: argparse.Namespace, load_model: Callable) -> int:
    from ..analysis.steering import directions, pair_differences
    from ..gguf.control_vector import write_control_vector
    from ..provenance import provenance

    positive, negative = read_prompts(args.positive, "--positive"), read_prompts(args.negative, "--negative")
    if len(positive) != len(negative):
        raise InvalidInputError(f"--positive has {len(positive)} prompts and --negative {len(negative)}: "
                                "they must pair up")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInputError(f"--out: directory {out.parent} does not exist")
    model = load_model(args)
    tok = model.tokenizer
    pos = [tok.encode(t, parse_special=True) for t in positive]
    neg = [tok.encode(t, parse_special=True) for t in negative]
    samples = pair_differences(model, pos, neg, args.positions)
    write_control_vector(out, directions(model, samples, args.method))
    counts = [len(d) for d in samples]
    if args.json:
        print(json.dumps({"out": str(out), "layers": list(range(1, model.config.n_layer)), "samples": counts,
                          "method": args.method, "positions": args.positions,
                          "reproduce": provenance(model, None, positive=args.positive, negative=args.negative,
                                                  method=args.method, positions=args.positions)}))
        return 0
    print(f"wrote {out}: {model.config.n_layer - 1} directions (layers 1..{model.config.n_layer - 1}), "
          f"{args.method} of {len(pos)} prompt pairs; apply with --control-vector {out}:STRENGTH")
    return 0
