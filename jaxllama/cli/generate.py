"""`jaxllama generate` and `jaxllama chat`: sampling settings, streaming output, JSON results."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..errors import InvalidInputError

DEFAULTS = {  # llama.cpp's defaults
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "penalty_last_n": 64,
}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (128)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy (0.8)")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="0 = off (40)")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="in (0, 1]; 1 = off (0.95)")
    p.add_argument("--min-p", type=float, default=DEFAULTS["min_p"], help="in [0, 1]; 0 = off (0.05)")
    p.add_argument("--repeat-penalty", type=float, default=DEFAULTS["repeat_penalty"], help="1 = off (1.0)")
    p.add_argument("--presence-penalty", type=float, default=DEFAULTS["presence_penalty"])
    p.add_argument("--frequency-penalty", type=float, default=DEFAULTS["frequency_penalty"])
    p.add_argument("--penalty-last-n", type=int, default=DEFAULTS["penalty_last_n"], help="penalty window (64)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed, 0..2**32-1 (0); chat turn i uses seed + i (mod 2**32)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")


def sampler_from_args(args: argparse.Namespace):
    from ..generation.sampling import Sampler

    return Sampler(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        penalty_last_n=args.penalty_last_n,
    )


def _visible(model: Any, ids: list[int]) -> list[int]:
    """The ids without end-of-generation tokens (they end the text, they are not part of it)."""
    return [t for t in ids if t not in model.tokenizer.eog_ids]


def cmd_generate(args: argparse.Namespace, load_model: Callable, input_tokens: Callable) -> int:
    from ..generation.loop import check_seed, generate, stream
    from ..provenance import provenance

    check_seed(args.seed)
    sampler = sampler_from_args(args)
    model = load_model(args)
    prompt = input_tokens(args, model)
    model.check_tokens(prompt, "prompt")
    if args.json:
        g = generate(model, [prompt], args.max_new_tokens, sampler, args.seed, not args.ignore_eos)
        ids = g.tokens[0]
        out = {
            "tokens": ids,
            "text": model.tokenizer.decode(_visible(model, ids)),
            "finish_reason": g.finish_reasons[0],
            "prompt_tokens": len(prompt),
            "prefill_tok_s": round(g.prefill_tok_s, 2),
            "decode_tok_s": round(g.decode_tok_s, 2),
            "compile_s": round(g.compile_s, 3),
            "seed": args.seed,
            "sampler": sampler.to_dict(),
            "reproduce": provenance(model, prompt, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                    ignore_eos=args.ignore_eos, sampler=sampler.to_dict()),
        }
        print(json.dumps(out))
        return 0
    t: dict[str, float] = {}
    _stream_text(model, stream(model, prompt, args.max_new_tokens, sampler, args.seed, not args.ignore_eos, t))
    sys.stdout.write("\n")
    rate = t["steps"] / t["decode_s"] if t.get("decode_s") else float("nan")
    print(f"[{t['prompt_tokens']} prompt tokens at {t['prompt_tokens'] / t['prefill_s']:.1f} tok/s, "
          f"{t['steps'] + 1} generated at {rate:.1f} tok/s, compile {t['compile_s']:.2f} s, seed {args.seed}]",
          file=sys.stderr)
    return 0


def _stream_text(model: Any, ids) -> list[int]:
    """Print the text of `ids` as they arrive (end-of-generation tokens hidden); return them."""
    eog = model.tokenizer.eog_ids
    dec = model.tokenizer.stream_decoder()
    got = []
    for tok in ids:
        got.append(tok)
        if tok in eog:
            continue
        sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    sys.stdout.write(dec.flush())
    sys.stdout.flush()
    return got


def cmd_chat(args: argparse.Namespace, load_model: Callable) -> int:
    """A conversation on stdin/stdout with the file's chat template; /exit or end of input quits."""
    from ..generation.loop import SEED_LIMIT, check_seed, stream

    check_seed(args.seed)
    sampler = sampler_from_args(args)
    model = load_model(args)
    tok = model.tokenizer
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        prompt = tok.encode(text, add_special=True, parse_special=True)
        room = model.config.context_length - len(prompt)
        if room < 1:
            raise InvalidInputError(f"the conversation ({len(prompt)} tokens) fills the context length "
                                    f"{model.config.context_length}")
        ids = _stream_text(model, stream(model, prompt, min(args.max_new_tokens, room), sampler,
                                         (args.seed + turn) % SEED_LIMIT, not args.ignore_eos))
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": tok.decode(_visible(model, ids))})
        turn += 1
