"""KL divergence between a base run and a model run on the same text, reported as llama.cpp's
`llama-perplexity --kl-divergence` reports it, over the positions `perplexity` scores.

The base is a `Model` (its log-softmax stays on the device), llama.cpp on a GGUF (`LlamaCppBase`),
or base log-probs saved by an earlier run (`SavedBase`, written with `save_base=`). Per position
the device returns KL(base || model), both NLLs and whether the top tokens agree; the host sums
them in float64. Differences from llama.cpp: the KL sums over the whole vocabulary in float32 from
exact base log-probs (llama.cpp stores the base as uint16-quantized log-probs and skips base
probabilities below e^-16), so tiny KL values come out slightly more exact here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ..errors import InvalidInputError
from ..parallel.placement import put_rows
from .buckets import Batch, RunStats, run
from .kernels import compiled, kl_rows, score_rows
from ..parallel.distributed import gather_rows
from .perplexity import Chunks, Progress, plan_share

SAVED_FORMAT = "jaxllama-base-logprobs-1"


def vocab_digest(tokens: Sequence[str]) -> str:
    """SHA-256 of a vocabulary (the token texts in id order)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8", "surrogatepass")).hexdigest()


def _vocab_of(metadata: dict[str, Any]) -> list[str]:
    return list(metadata.get("tokenizer.ggml.tokens") or [])


def check_same_vocab(base_vocab: str, model: Any, what: str) -> None:
    """Refuse a base whose vocabulary differs from the model's (log-probs would not line up)."""
    mine = _vocab_of(model.metadata)
    if base_vocab != vocab_digest(mine):
        raise InvalidInputError(f"{what} and the model have different vocabularies; KL divergence needs the same tokens")


class ModelBase:
    """A jaxllama `Model` as the base run: its log-softmax is computed and kept on the device."""

    def __init__(self, model: Any):
        self.model = model
        self.vocab = vocab_digest(_vocab_of(model.metadata))
        self.compile_s = 0.0
        self.describe = {"kind": "jaxllama", "path": str(model.source), "sha256": model.sha256, "dtype": model.dtype,
                         "act_quant": model.act_quant is not None}

    def logprobs(self, b: Batch, first: int) -> Any:
        m = self.model
        args = (m.params, *put_rows(getattr(m, "mesh", None), b.tokens, b.valid, b.at, b.targets))
        exe, spent = compiled(score_rows, {"config": m.config, "act_quant": m.act_quant, "top_k": 0, "full": True}, *args)
        self.compile_s += spent
        return exe(*args)["full"]

    def close(self) -> None:
        pass


class LlamaCppBase:
    """llama.cpp on a GGUF as the base run (bit-close settings unless `bit_close=False`)."""

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, bit_close: bool = True):
        from ..gguf.reader import read_gguf
        from ..gguf.default_model import sha256_file

        self.path, self.n_threads, self.bit_close = Path(path), n_threads, bit_close
        self.vocab = vocab_digest(_vocab_of(read_gguf(self.path).metadata))
        self.compile_s = 0.0
        self.describe = {"kind": "llama.cpp", "path": str(self.path), "sha256": sha256_file(self.path),
                         "bit_close": bit_close}
        self._chunks = None

    def logprobs(self, b: Batch, first: int) -> Any:
        from .llamacpp import LlamaCppChunks

        ctx = b.tokens.shape[1]
        if self._chunks is None:
            self._chunks = LlamaCppChunks(self.path, ctx, n_seq=1, n_threads=self.n_threads,
                                          bit_close=self.bit_close)
        out = np.zeros((*b.at.shape, self._chunks.n_vocab), np.float32)
        for j, i in enumerate(b.rows):  # one chunk at a time, its log-probs a slab of positions at a time
            if i >= 0:
                for p0, lp in self._chunks.logprob_slabs(b.tokens[j]):
                    out[j, p0: p0 + len(lp)] = lp
        return jnp.asarray(out)

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None


class SavedBase:
    """Base log-probs saved by an earlier `kl_divergence(..., save_base=PATH)` (an .npz file)."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as npz:
                if str(npz["format"]) != SAVED_FORMAT:
                    raise ValueError
                self.meta = json.loads(str(npz["meta"]))
        except FileNotFoundError:
            raise InvalidInputError(f"{p}: no such file") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            raise InvalidInputError(f"{p}: not a base log-probs file written by jaxllama kl-divergence --save-base") from None
        self.vocab = self.meta["vocab_sha256"]
        self.compile_s = 0.0
        self.describe = {"kind": "saved", "path": str(p), "base": self.meta["base"]}
        self.path = p
        self._logprobs: np.ndarray | None = None

    def check(self, tokens: np.ndarray, ctx: int) -> None:
        """The saved run must cover these chunks of this text at this ctx."""
        with np.load(self.path, allow_pickle=False) as npz:
            saved = npz["tokens"]
        if self.meta["ctx"] != ctx:
            raise InvalidInputError(f"{self.path}: saved at ctx {self.meta['ctx']}, not {ctx}")
        if len(tokens) > len(saved) or not np.array_equal(saved[: len(tokens)], tokens):
            raise InvalidInputError(f"{self.path}: saved for another text (or fewer chunks); its tokens differ")

    def logprobs(self, b: Batch, first: int) -> Any:
        """The saved rows of this batch, read from the file by offset: memory holds one batch,
        whatever the base file's size (a 152k vocabulary over 4,096 tokens is 1.2 GB)."""
        if self._logprobs is None:
            self._logprobs = stored_member(self.path, "logprobs.npy")
        offset, shape = self._logprobs
        out = np.zeros((*b.at.shape, shape[-1]), np.float32)
        row = shape[1] * shape[2] * 4
        with open(self.path, "rb") as fh:
            for j, i in enumerate(b.rows):
                if i >= 0:
                    fh.seek(offset + i * row)
                    if fh.readinto(memoryview(out[j, : shape[1]]).cast("B")) != row:
                        raise InvalidInputError(f"{self.path}: truncated base log-probs file")
        return jnp.asarray(out)

    def close(self) -> None:
        self._logprobs = None


def stored_member(path: Path, member: str) -> tuple[int, tuple[int, ...]]:
    """Byte offset and shape of the float32 C-order array `member` stored (uncompressed, as
    `np.savez` writes) in the .npz `path`, so its rows can be read where they lie."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise InvalidInputError(f"{path}: {member} is compressed; save the base again with --save-base")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)  # the local file header: its name and extra field lengths at 26 and 28
        if local[:4] != b"PK\x03\x04":
            raise InvalidInputError(f"{path}: not a base log-probs file written by jaxllama kl-divergence --save-base")
        fh.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        if dtype != np.float32 or fortran or len(shape) != 3:
            raise InvalidInputError(f"{path}: {member} is not a float32 [chunks, positions, vocab] array")
        return fh.tell(), tuple(shape)


def mean_and_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and llama.cpp's uncertainty of it: sqrt(var / (n - 1)), 0 for n <= 10."""
    v = np.asarray(values, np.float64)
    n = v.size
    mean = v.sum() / n
    var = (v * v).sum() / n - mean * mean
    return float(mean), float(math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


KLD_PERCENTILES = {"min": 0.0, "0.1": 0.001, "1": 0.01, "5": 0.05, "10": 0.10, "median": 0.5, "90": 0.90,
                   "95": 0.95, "99": 0.99, "99.9": 0.999, "max": 1.0}
DP_PERCENTILES = {"min": 0.0, "0.1": 0.001, "1": 0.01, "5": 0.05, "10": 0.10, "25": 0.25, "median": 0.5,
                  "75": 0.75, "90": 0.90, "95": 0.95, "99": 0.99, "99.9": 0.999, "max": 1.0}


def _percentiles(v: np.ndarray, which: dict[str, float]) -> dict[str, float]:
    """llama.cpp's percentiles: linear interpolation between sorted values (numpy's default)."""
    return {k: float(np.quantile(v, q)) for k, q in which.items()}


def kl_summary(kld: np.ndarray, nll: np.ndarray, nll_base: np.ndarray, same_top: np.ndarray) -> dict[str, Any]:
    """llama.cpp's --kl-divergence statistics from per-position values (all float64 on the host)."""
    kld, nll, nll_base = (np.asarray(a, np.float64).ravel() for a in (kld, nll, nll_base))
    same_top = np.asarray(same_top, bool).ravel()
    n = kld.size
    log_ppl, log_ppl_err = mean_and_err(nll)
    log_base, log_base_err = mean_and_err(nll_base)
    cov = ((nll * nll_base).sum() / n - (nll.sum() / n) * (nll_base.sum() / n)) / (n - 1) if n >= 10 else 0.0
    ratio_log = log_ppl - log_base
    ratio_log_err = math.sqrt(max(0.0, log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov))
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    dp_mean, dp_err = mean_and_err(p_diff)
    mse, mse_err = mean_and_err(p_diff ** 2)
    rms = math.sqrt(mse)
    same = same_top.mean()
    kmean, kerr = mean_and_err(kld)
    return {
        "kld_mean": kmean,
        "kld_err": kerr,
        "kld_percentiles": _percentiles(kld, KLD_PERCENTILES),
        "same_top_rate": float(same),
        "same_top_err": float(math.sqrt(same * (1 - same) / (n - 1))) if n > 1 else 0.0,
        "delta_p": {"mean": dp_mean, "mean_err": dp_err, "rms": rms, "rms_err": 0.5 / rms * mse_err if rms else 0.0,
                    "percentiles": _percentiles(p_diff, DP_PERCENTILES)},
        "ppl": math.exp(log_ppl),
        "ppl_err": math.exp(log_ppl) * log_ppl_err,
        "ppl_base": math.exp(log_base),
        "ppl_base_err": math.exp(log_base) * log_base_err,
        "ppl_ratio": math.exp(ratio_log),
        "ppl_ratio_err": math.exp(ratio_log) * ratio_log_err,
        "log_ppl_ratio": ratio_log,
        "log_ppl_ratio_err": ratio_log_err,
        "cor_log_ppl": cov / (log_ppl_err * log_base_err) if log_ppl_err and log_base_err else 0.0,
        "n_scored": int(n),
    }


@dataclass
class KLDivergence:
    """A KL run: per-position arrays `[n_chunks, ctx/2 - 1]` and llama.cpp's summary statistics."""

    summary: dict[str, Any]
    kld: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray
    same_top: np.ndarray
    ctx: int
    n_chunks: int
    n_tokens: int
    tok_s: float  # model tokens per second of the KL forward, compilation excluded
    wall_s: float
    compile_s: float
    base: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # kld_mean, ppl_ratio, ... from the summary
        summary = self.__dict__.get("summary", {})
        if name in summary:
            return summary[name]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        """The JSON fields of `jaxllama kl-divergence --json` (without `reproduce`)."""
        return {**self.summary, "n_tokens": self.n_tokens, "n_chunks": self.n_chunks, "tok_s": round(self.tok_s, 2),
                "wall_s": round(self.wall_s, 3), "compile_s": round(self.compile_s, 3), "base": self.base}


def _as_base(base: Any) -> Any:
    if hasattr(base, "logprobs") and hasattr(base, "vocab"):
        return base
    if hasattr(base, "params") and hasattr(base, "config"):
        return ModelBase(base)
    raise InvalidInputError("base: expected a Model, LlamaCppBase or SavedBase")


def kl_divergence(base: Any, model: Any, text: str | Sequence[int], ctx: int, chunks: int | None = None,
                  batch_size: int | None = None, progress: Progress | None = None,
                  save_base: str | os.PathLike | None = None) -> KLDivergence:
    """KL(base || model) and llama.cpp's statistics over llama-perplexity's scored positions.

    `base`: a `Model`, `LlamaCppBase(path)` or `SavedBase(path)`. The text is tokenized by `model`
    (both must share the vocabulary). `save_base` writes the base log-probs for reuse
    (`SavedBase`); `progress(done, total, running mean KLD)` follows the chunks. Under
    `jax.distributed` each process scores its share of the chunks and the per-position values are
    gathered (`save_base` is then refused: each process holds only its chunks' base).
    """
    t0 = time.perf_counter()
    src = _as_base(base)
    check_same_vocab(src.vocab, model, "the base")
    c = Chunks.of(model, text, ctx, chunks, batch_size)
    ctx, tokens, rows, mine, bs = c.ctx, c.tokens, c.rows, c.mine, c.batch_size
    if isinstance(src, SavedBase):
        src.check(np.asarray(tokens[: len(rows) * ctx], np.int32), ctx)
    if save_base is not None and len(mine) != len(rows):
        raise InvalidInputError("--save-base needs a single process (each process sees only its chunks)")
    first, n = ctx // 2, len(rows[0].at)
    shape = (len(rows), n)
    kld, nll, nll_base = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    same = np.zeros(shape, bool)
    saving = _Saver(save_base, shape, model.config.vocab_size) if save_base is not None else None
    rs = RunStats()
    done = 0

    def base_of(b: Batch) -> tuple[Any]:
        lp = src.logprobs(b, first)
        if saving is not None:
            saving.add(b, lp, n)
        return (lp,)

    try:
        for b, out in run(model, plan_share(rows, mine, bs, model.config.context_length, ctx), kl_rows, rs,
                          extra=base_of):
            host = {k: np.asarray(v)[:, :n] for k, v in out.items()}
            for j, i in enumerate(b.rows):
                if i >= 0:
                    kld[i], nll[i], nll_base[i], same[i] = host["kld"][j], host["nll"][j], host["nll_base"][j], host["same_top"][j]
                    done += 1
            if progress is not None:
                progress(done, len(mine), float(kld[mine.start:mine.start + done].mean()))
        if saving is not None:
            saving.write(np.asarray(tokens[: len(rows) * ctx], np.int32), ctx, src.describe, src.vocab)
    finally:
        src.close()  # frees llama.cpp's context or the loaded log-probs; the source stays reusable
        if saving is not None:
            saving.discard()
    full = gather_rows({"kld": kld, "nll": nll, "nll_base": nll_base, "same": same})
    kld, nll, nll_base, same = full["kld"], full["nll"], full["nll_base"], full["same"]
    n_tokens = len(rows) * ctx
    return KLDivergence(kl_summary(kld, nll, nll_base, same), kld, nll, nll_base, same, ctx, len(rows), n_tokens,
                        n_tokens / rs.run_s if rs.run_s else float("nan"), time.perf_counter() - t0,
                        rs.compile_s + src.compile_s, src.describe)


def check_save_path(path: str | os.PathLike) -> Path:
    """Where `--save-base` may write: a file (new or replaced) in an existing, writable directory.
    Checked before the base run, not after it."""
    p = Path(path)
    if p.is_dir():
        raise InvalidInputError(f"--save-base: {p} is a directory; name a file, e.g. {p / 'base.npz'}")
    if not p.parent.is_dir():
        raise InvalidInputError(f"--save-base: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise InvalidInputError(f"--save-base: directory {p.parent} is not writable")
    return p


class _Saver:
    """Collects base log-probs in a temporary memory-mapped file, then writes the .npz (bounded RAM)."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], vocab: int):
        self.path = check_save_path(path)
        self._tmp = tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".tmp", delete=False)
        self.data = np.lib.format.open_memmap(self._tmp.name, mode="w+", dtype=np.float32, shape=(*shape, vocab))

    def add(self, b: Batch, lp: Any, n: int) -> None:
        host = np.asarray(lp)
        for j, i in enumerate(b.rows):
            if i >= 0:
                self.data[i] = host[j, :n]

    def write(self, tokens: np.ndarray, ctx: int, describe: dict[str, Any], vocab: str) -> None:
        meta = json.dumps({"ctx": ctx, "base": describe, "vocab_sha256": vocab})
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                np.savez(f, format=np.array(SAVED_FORMAT), meta=np.array(meta), tokens=tokens, logprobs=self.data)
            partial.replace(self.path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise InvalidInputError(f"--save-base: cannot write {self.path} ({e.strerror or e})") from None

    def discard(self) -> None:
        del self.data
        self._tmp.close()
        Path(self._tmp.name).unlink(missing_ok=True)
