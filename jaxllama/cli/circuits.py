"""`jaxllama lens`, `jaxllama attention`, `jaxllama patch`: the analyses of `jaxllama.analysis`
from the command line, each with `--json` (and its `reproduce` block) and `--plot FILE.png`."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from ..errors import InvalidInputError
from ..gguf.convert import WEIGHTS


def add_parsers(sub: Any, model_arg: Callable, input_args: Callable) -> None:
    lens = sub.add_parser("lens", help="logit lens: each layer's residual stream read through the final norm "
                                       "and output (top tokens, target probability and rank, entropy, KL)")
    model_arg(lens)
    input_args(lens)
    lens.add_argument("--target", help="a token (text that is exactly one token, e.g. ' Paris') whose probability "
                                       "and rank are reported at every position (default: the next token)")
    lens.add_argument("--k", type=int, default=5, help="top tokens per cell (5)")
    lens.add_argument("--ffn-inp", action="store_true",
                      help="also read the residual stream after attention (ffn_inp; Gemma: sa_out)")
    lens.add_argument("--lens", default="logit", choices=("logit", "tuned"),
                      help="logit lens, or the tuned lens (with --translators from `jaxllama lens train`)")
    lens.add_argument("--translators", metavar="FILE", help="tuned-lens translators written by `jaxllama lens train`")
    _outputs(lens)

    train = sub.add_parser("lens-train", help="`jaxllama lens train`: fit tuned-lens translators on a text")
    model_arg(train)
    train.add_argument("--file", required=True, help="UTF-8 text to train on (its last --held-out part is held out)")
    train.add_argument("--out", required=True, metavar="FILE", help="where to write the translators (.npz)")
    train.add_argument("--steps", type=int, default=200, help="Adam steps (200)")
    train.add_argument("--batch", type=int, default=32, help="positions per step (32)")
    train.add_argument("--ctx", type=int, default=128, help="tokens per row when capturing the text (128)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    train.add_argument("--held-out", type=float, default=0.1, help="fraction of the text held out (0.1)")
    train.add_argument("--seed", type=int, default=0, help="seed of the batches (0)")
    train.add_argument("--weights", "--dtype", dest="weights", default="auto",
                       choices=WEIGHTS, help="weight layout (auto: GGUF's blocks)")
    train.add_argument("--json", action="store_true", help="print the held-out KL per layer as JSON")

    att = sub.add_parser("attention", help="attention patterns (kq_soft_max) of chosen layers and per-head scores: "
                                           "previous token, induction, sink, direct logit attribution")
    model_arg(att)
    input_args(att)
    att.add_argument("--layers", help="layers whose patterns are kept and plotted, e.g. 0,3-4 (default: none)")
    att.add_argument("--target", help="the token whose logit heads are attributed to (default: the top prediction)")
    att.add_argument("--induction-length", type=int, default=32,
                     help="length of the random sequence repeated for the induction score (32)")
    att.add_argument("--seed", type=int, default=0, help="seed of that random sequence (0)")
    _outputs(att)

    pt = sub.add_parser("patch", help="activation patching sweep: clean activations into the corrupted run, "
                                      "one layer x position (or head) at a time, batched")
    model_arg(pt)
    pt.add_argument("--clean", required=True, help="the clean prompt")
    pt.add_argument("--corrupted", required=True, help="the corrupted prompt (same number of tokens)")
    pt.add_argument("--answer", required=True, help="the clean answer token (text of exactly one token)")
    pt.add_argument("--wrong", help="the corrupted answer token, for --metric logit_diff")
    pt.add_argument("--metric", default="logit_diff", choices=("logit_diff", "prob"),
                    help="logit(answer) - logit(wrong), or the answer's probability, at the last position")
    pt.add_argument("--probe", default="l_out", help="l_out, attn_out, ffn_out, ffn_inp or kqv_out (per head)")
    pt.add_argument("--batch", type=int, default=16, help="cells per forward (16)")
    pt.add_argument("--attribution", action="store_true",
                    help="attribution patching: each cell estimated to first order, grad . (clean - corrupted), "
                         "from one forward and one backward (with --compare, next to the real sweep)")
    pt.add_argument("--compare", action="store_true",
                    help="with --attribution: also run the real sweep and report their rank correlation")
    pt.add_argument("--weights", "--dtype", dest="weights", default="auto",
                    choices=WEIGHTS, help="weight layout (auto: GGUF's blocks)")
    _outputs(pt)


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results and a reproduce block as one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="save a plot")


def one_token(model: Any, text: str | None, what: str) -> int | None:
    """The id of `text`, which must be exactly one token of the model's vocabulary."""
    if text is None:
        return None
    ids = model.tokenizer.encode(text, add_special=False)
    if len(ids) != 1:
        raise InvalidInputError(f"{what}: {text!r} is {len(ids)} tokens, not one ({ids[:8]})")
    return ids[0]


def piece_of(model: Any) -> Callable[[int], str]:
    tok = model.tokenizer
    return lambda i: tok.token_to_piece(int(i)).decode("utf-8", "replace")


def _check_plot(path: str | None) -> None:
    import os

    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise InvalidInputError(f"--plot: directory of {path} does not exist")


def cmd_lens(args: argparse.Namespace, load_model: Callable, input_tokens: Callable) -> int:
    from ..analysis.lens import logit_lens, plot_lens
    from ..provenance import provenance

    _check_plot(args.plot)
    model = load_model(args)
    tokens = input_tokens(args, model)
    target = one_token(model, args.target, "--target")
    probes = [n for n in ("ffn_inp", "sa_out") if n in model.config.layer_probes][:1] if args.ffn_inp else []
    translators = None
    if args.lens == "tuned":
        from ..analysis.tuned import load_translators

        if not args.translators or probes:
            raise InvalidInputError("--lens tuned needs --translators FILE (and reads l_out only: no --ffn-inp)")
        translators = load_translators(args.translators, model)
    lens = logit_lens(model, tokens, target, args.k, probes=(*probes, "l_out"), translators=translators)
    piece = piece_of(model)
    if args.plot:
        plot_lens(lens, piece, args.plot)
    if args.json:
        out = {**lens.to_json(), "lens": args.lens,
               "reproduce": provenance(model, [int(t) for t in tokens], target=target, k=args.k,
                                       probes=lens.probes[: len(probes) + 1], lens=args.lens,
                                       translators=args.translators)}
        print(json.dumps(out))
        return 0
    print(f"{'layer':>5} {'probe':<8} {'top (last position)':<24} {'p':>7} {'target p':>9} {'rank':>6} "
          f"{'entropy':>8} {'KL':>8}")
    for i, (layer, probe) in enumerate(zip(lens.layers, lens.probes)):
        top = repr(piece(lens.top_ids[i, -1, 0]))[:22]
        tp, rank = lens.target_prob[i, -1], lens.target_rank[i, -1]
        print(f"{layer:>5} {probe:<8} {top:<24} {lens.top_probs[i, -1, 0]:7.4f} "
              f"{'-' if rank < 0 else f'{tp:9.4f}':>9} {'-' if rank < 0 else rank:>6} "
              f"{lens.entropy[i, -1]:8.3f} {lens.kl_to_final[i, -1]:8.4f}")
    return 0


def cmd_attention(args: argparse.Namespace, load_model: Callable, input_tokens: Callable, parse_layers: Callable) -> int:
    import numpy as np

    from ..analysis.attention import attention_patterns, head_scores, plot_attention
    from ..provenance import provenance

    _check_plot(args.plot)
    model = load_model(args)
    layers = parse_layers(args.layers, model.config.n_layer) if args.layers else []
    tokens = input_tokens(args, model)
    target = one_token(model, args.target, "--target")
    scores = head_scores(model, tokens, target, args.induction_length, args.seed)
    patterns = attention_patterns(model, tokens, layers) if layers else {}
    piece = piece_of(model)
    if args.plot:
        plot_attention(patterns, scores, [piece(scores.target_id)], args.plot)
    if args.json:
        out = {"layers": list(patterns), "tokens": [int(t) for t in tokens],
               "kq_soft_max": {str(k): np.round(v.astype(np.float64), 7).tolist() for k, v in patterns.items()},
               "scores": scores.to_json(),
               "reproduce": provenance(model, [int(t) for t in tokens], layers=list(patterns), target=scores.target_id,
                                       induction_length=args.induction_length, seed=args.seed)}
        print(json.dumps(out))
        return 0
    print(f"direct logit attribution onto {piece(scores.target_id)!r} (id {scores.target_id}); top heads:")
    for name in ("previous_token", "induction", "sink", "direct_logit"):
        grid = getattr(scores, name)
        flat = np.argsort(-grid, axis=None)[:3]
        best = ", ".join(f"L{i // grid.shape[1]}H{i % grid.shape[1]} {grid.flat[i]:.3f}" for i in flat)
        print(f"  {name:<15} {best}")
    return 0


def cmd_patch(args: argparse.Namespace, load_model: Callable) -> int:
    from ..analysis.patching import patch_sweep, plot_sweep
    from ..provenance import provenance

    _check_plot(args.plot)
    if args.batch < 1:
        raise InvalidInputError(f"--batch: must be at least 1, not {args.batch}")
    model = load_model(args)
    tok = model.tokenizer
    clean, corrupted = tok.encode(args.clean), tok.encode(args.corrupted)
    answer = one_token(model, args.answer, "--answer")
    wrong = one_token(model, args.wrong, "--wrong")
    if args.compare and not args.attribution:
        raise InvalidInputError("--compare goes with --attribution")
    extra: dict[str, Any] = {"method": "attribution" if args.attribution else "patching"}
    if args.attribution:
        from ..analysis.gradients import attribution_sweep, rank_correlation

        sweep = attribution_sweep(model, clean, corrupted, answer, wrong, args.probe, args.metric)
        if args.compare:
            real = patch_sweep(model, clean, corrupted, answer, wrong, args.probe, args.metric, args.batch)
            extra |= {"patching_grid": real.to_json()["grid"], "rank_correlation": rank_correlation(sweep.grid, real.grid)}
    else:
        sweep = patch_sweep(model, clean, corrupted, answer, wrong, args.probe, args.metric, args.batch)
    piece = piece_of(model)
    labels = [piece(t) for t in corrupted]
    if args.plot:
        plot_sweep(sweep, labels, args.plot)
    if args.json:
        out = {**sweep.to_json(), **extra, "clean_tokens": clean, "corrupted_tokens": corrupted, "answer_id": answer,
               "wrong_id": wrong, "seconds": round(sweep.seconds, 3),
               "reproduce": provenance(model, clean, corrupted=corrupted, answer=answer, wrong=wrong, probe=args.probe,
                                       metric=args.metric, batch=args.batch, attribution=args.attribution)}
        print(json.dumps(out))
        return 0
    print(f"{extra['method']}, metric {args.metric}: clean {sweep.metric_clean:.4f}, corrupted "
          f"{sweep.metric_corrupted:.4f}; {sweep.grid.size} cells in {sweep.seconds:.2f} s")
    if "rank_correlation" in extra:
        print(f"rank correlation with the real patching sweep: {extra['rank_correlation']:.3f}")
    cols = sweep.positions if sweep.positions is not None else sweep.heads
    print("layer " + " ".join(f"{(labels[c] if sweep.positions is not None else f'H{c}')[:6]:>6}" for c in cols))
    for layer, row in zip(sweep.layers, sweep.grid):
        print(f"{layer:>5} " + " ".join(f"{v:6.2f}" for v in row))
    return 0


def cmd_lens_train(args: argparse.Namespace, load_model: Callable) -> int:
    from pathlib import Path

    from ..analysis.tuned import held_out_kl, train_translators
    from ..provenance import provenance

    if not 0 < args.held_out < 1:
        raise InvalidInputError(f"--held-out: must be between 0 and 1, not {args.held_out}")
    if args.steps < 1 or args.batch < 1 or args.ctx < 2 or not args.lr > 0:
        raise InvalidInputError("--steps and --batch must be at least 1, --ctx at least 2, --lr above 0")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInputError(f"--out: directory {out.parent} does not exist")
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"--file: cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    model = load_model(args)
    ids = model.tokenizer.encode(text)
    cut = int(len(ids) * (1 - args.held_out))
    if cut < 2 * args.ctx or len(ids) - cut < 2:
        raise InvalidInputError(f"--file: {len(ids)} tokens are too few for --ctx {args.ctx} and a held-out part")
    translators = train_translators(model, ids[:cut], args.steps, args.batch, args.ctx, args.lr, args.seed)
    translators.save(out)
    kl = held_out_kl(model, ids[cut:], translators, args.ctx)
    if args.json:
        print(json.dumps({"held_out_kl": kl, "out": str(out),
                          "reproduce": provenance(model, None, file=args.file, steps=args.steps, batch=args.batch,
                                                  ctx=args.ctx, lr=args.lr, held_out=args.held_out, seed=args.seed)}))
        return 0
    print(f"wrote {out}; held-out KL(final || lens) per layer, logit lens -> tuned lens:")
    for i, (a, b) in enumerate(zip(kl["logit"], kl["tuned"])):
        print(f"  layer {i:>3}: {a:8.4f} -> {b:8.4f}")
    return 0
