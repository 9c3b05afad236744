"""lm-evaluation-harness's scoring interface on a `Model`: `loglikelihood`, `loglikelihood_rolling`,
and per-token log-probabilities (`token_logprobs`), all batched through `buckets`.

Text is tokenized as lm-eval does for causal models: the continuation's ids are those of
`context + continuation` after the context's own ids (trailing spaces of the context move to the
continuation), and an empty context becomes the prefix token (BOS, else EOS). Inputs longer than
the context window lose their oldest context tokens, as in lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from ..errors import InvalidInputError
from .buckets import Row, RunStats, check_batch_size, plan, run
from .kernels import score_rows

Tokens = Union[Sequence[int], np.ndarray]
Request = Union[tuple[str, str], tuple[Tokens, Tokens]]


def _ids(model: Any, ids: Tokens, what: str, allow_empty: bool = False) -> list[int]:
    if allow_empty and len(ids) == 0:
        return []
    return model.check_tokens(ids, what).tolist()


def prefix_token(model: Any) -> int:
    """The token an empty context stands for (lm-eval's `prefix_token_id`): BOS, else EOS."""
    tok = model.tokenizer
    pid = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if pid is None:
        raise InvalidInputError("empty context: the model has neither a BOS nor an EOS token to stand for it")
    return pid


def encode_pair(model: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a text pair into context ids and continuation ids (causal models)."""
    tok = model.tokenizer
    if context == "":
        cont = tok.encode(continuation, add_special=False)
        return [prefix_token(model)], cont
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special=True)
    ctx = tok.encode(context, add_special=True)
    return whole[: len(ctx)], whole[len(ctx):]


def _request_ids(model: Any, i: int, req: Any) -> tuple[list[int], list[int]]:
    try:
        context, continuation = req
    except (TypeError, ValueError):
        raise InvalidInputError(f"requests[{i}]: expected a (context, continuation) pair") from None
    if isinstance(context, str) and isinstance(continuation, str):
        if continuation == "":
            raise InvalidInputError(f"requests[{i}]: empty continuation")
        ctx, cont = encode_pair(model, context, continuation)
    elif isinstance(context, str) or isinstance(continuation, str):
        raise InvalidInputError(f"requests[{i}]: context and continuation must both be text or both token ids")
    else:
        if len(continuation) == 0:
            raise InvalidInputError(f"requests[{i}]: empty continuation")
        ctx = _ids(model, context, f"requests[{i}] context", allow_empty=True) or [prefix_token(model)]
        cont = _ids(model, continuation, f"requests[{i}] continuation")
    if not cont:
        raise InvalidInputError(f"requests[{i}]: the continuation {continuation!r} tokenizes to nothing")
    return ctx, cont


def continuation_row(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> Row:
    """The forward input `(ctx + cont)[:-1]`, cut to its last `max_length` tokens, scoring `cont`."""
    if len(cont) > max_length:
        raise InvalidInputError(f"a continuation of {len(cont)} tokens does not fit the context window {max_length}")
    whole = np.asarray(list(ctx) + list(cont), np.int32)[-(max_length + 1):]
    tokens = whole[:-1]
    at = np.arange(len(tokens) - len(cont), len(tokens), dtype=np.int32)
    return Row(tokens, at, np.asarray(cont, np.int32))


def _max_length(model: Any, max_length: int | None) -> int:
    c = model.config.context_length
    if max_length is None:
        return c
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not 1 <= max_length <= c:
        raise InvalidInputError(f"max_length must be an integer in [1, {c}], got {max_length!r}")
    return int(max_length)


def score(model: Any, rows: Sequence[Row], batch_size: int, top_k: int = 0,
          stats: dict[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    """Score rows in length buckets; per row, the kernel's outputs trimmed to its scored positions.

    Every batch has `batch_size` rows (fewer when there are fewer requests in all).
    """
    check_batch_size(batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= model.config.vocab_size:
        raise InvalidInputError(f"top_k must be an integer in [0, {model.config.vocab_size}], got {top_k!r}")
    rs = RunStats()
    results: list[dict[str, np.ndarray]] = [{} for _ in rows]
    batches = plan(rows, min(batch_size, len(rows)), model.config.context_length)  # no all-dummy batch rows
    for b, out in run(model, batches, score_rows, rs, top_k=int(top_k), full=False):
        host = {k: np.asarray(v) for k, v in out.items()}
        for j, i in enumerate(b.rows):
            if i >= 0:
                results[i] = {k: v[j, : len(rows[i].at)] for k, v in host.items()}
    if stats is not None:
        stats.update(rs.as_dict())
    return results


def loglikelihood(model: Any, requests: Sequence[Request], batch_size: int = 8, max_length: int | None = None,
                  stats: dict[str, Any] | None = None) -> list[tuple[float, bool]]:
    """`(sum of log p(continuation | context), is_greedy)` per `(context, continuation)` request.

    Requests are pairs of texts or pairs of token-id lists. `is_greedy`: every continuation token
    is the argmax of its prediction (a tie with another token counts as greedy). `stats`, if
    given, receives the compilations, timings and bucket shapes of this call.
    """
    if len(requests) == 0:
        raise InvalidInputError("requests: empty list")
    n = _max_length(model, max_length)
    rows = [continuation_row(*_request_ids(model, i, r), n) for i, r in enumerate(requests)]
    return [(float(np.sum(r["logprob"], dtype=np.float64)), bool(np.all(r["greedy"])))
            for r in score(model, rows, batch_size, stats=stats)]


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context length 1): `(context, continuation)` pairs that
    predict every token exactly once, each with as much preceding text as fits in `max_length`."""
    out = []
    first = min(max_length, len(tokens))
    out.append(([prefix], list(tokens[:first])))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = list(tokens[max(0, end - max_length - 1): end - 1])
        out.append((window[: len(window) - (n - 1)], list(tokens[end - n: end])))
        done = end
    return out


def loglikelihood_rolling(model: Any, texts: Sequence[str | Tokens], batch_size: int = 8,
                          max_length: int | None = None, stats: dict[str, Any] | None = None) -> list[float]:
    """The full log-likelihood of each text (or token list), lm-eval's way: the prefix token, then
    windows of `max_length` (default: the model's context) that together score every token once."""
    if len(texts) == 0:
        raise InvalidInputError("texts: empty list")
    n = _max_length(model, max_length)
    prefix = prefix_token(model)
    rows, owner = [], []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if not text:
                raise InvalidInputError(f"texts[{i}]: empty text")
            ids = model.tokenizer.encode(text, add_special=False)
        else:
            ids = _ids(model, text, f"texts[{i}]")
        for ctx, cont in rolling_windows(ids, prefix, n):
            rows.append(continuation_row(ctx, cont, n))
            owner.append(i)
    totals = np.zeros(len(texts), np.float64)
    for i, r in zip(owner, score(model, rows, batch_size, stats=stats)):
        totals[i] += np.sum(r["logprob"], dtype=np.float64)
    return totals.tolist()


@dataclass
class TokenLogprobs:
    """Per-token scores of one sequence, aligned with `tokens` (index 0 has no prediction: NaN / -1).

    `logprobs[i]` = log p(tokens[i] | tokens[:i]); `greedy[i]`: tokens[i] was the argmax;
    `top_ids[i]`, `top_logprobs[i]`: the k likeliest tokens at that point (with `top_k`).
    """

    tokens: list[int]
    logprobs: np.ndarray
    greedy: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @property
    def surprisal(self) -> np.ndarray:
        """-log2 p per token, in bits."""
        return -self.logprobs / np.log(2.0)


def token_logprobs(model: Any, tokens: Tokens | Sequence[Tokens], top_k: int = 0, batch_size: int = 8,
                   stats: dict[str, Any] | None = None) -> TokenLogprobs | list[TokenLogprobs]:
    """Log-probabilities of every token given the ones before it, for one sequence of ids (returns
    one `TokenLogprobs`) or a list of them (returns a list), optionally with the top-k alternatives."""
    single = (isinstance(tokens, np.ndarray) and tokens.ndim == 1) or (
        len(tokens) > 0 and isinstance(tokens[0], (int, np.integer)))
    seqs = [tokens] if single else list(tokens)
    if not seqs:
        raise InvalidInputError("tokens: empty list")
    rows = []
    for i, s in enumerate(seqs):
        ids = model.check_tokens(s, "tokens" if single else f"tokens[{i}]")
        if len(ids) < 2:
            raise InvalidInputError("tokens: need at least 2 tokens (the first one has no prediction)")
        rows.append(Row(ids[:-1], np.arange(len(ids) - 1, dtype=np.int32), ids[1:]))
    out = []
    for s, r in zip(seqs, score(model, rows, batch_size, top_k=top_k, stats=stats)):
        lp = np.concatenate([[np.nan], r["logprob"].astype(np.float64)])
        greedy = np.concatenate([[False], r["greedy"]])
        ti = tl = None
        if top_k:
            ti = np.concatenate([np.full((1, top_k), -1), r["top_id"]]).astype(np.int64)
            tl = np.concatenate([np.full((1, top_k), np.nan), r["top_logprob"]])
        out.append(TokenLogprobs([int(t) for t in s], lp, greedy, ti, tl))
    return out[0] if single else out
