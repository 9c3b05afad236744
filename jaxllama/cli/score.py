"""`jaxllama perplexity` and `jaxllama kl-divergence`: llama-perplexity's two measurements, from
jitted batched forwards, with a progress bar (stderr, only on a terminal) and `--json` results
that carry a `reproduce` block."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from ..errors import InvalidInputError
from .steer import add_control_vector_args, with_control_vectors

DTYPES = ["float32", "native", "bfloat16"]
SCORING_HELP = ("weight layout: native (default: GGUF blocks kept, memory that follows the file's size; the same "
                "values as float32, which scores about as fast at four to six times the memory), float32, "
                "bfloat16 (lossy)")


def add_mesh_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", metavar="DATAxMODEL", help="split over a device mesh, e.g. 2x2: rows over DATA devices, "
                                                       "matrices over MODEL devices (default: one device)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many processes (jax.distributed; or JAXLLAMA_COORDINATOR, JAXLLAMA_NUM_PROCESSES, "
                             "JAXLLAMA_PROCESS_ID, JAXLLAMA_DIST_TIMEOUT)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, which hosts the coordinator")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in all")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (process 0 prints)")
    g.add_argument("--dist-timeout", type=int, metavar="S", help="seconds to wait for the coordinator (60)")
    g.add_argument("--timeout", type=int, metavar="S", help="seconds an exchange of results may wait for the "
                   "other processes before this one stops with an error (600)")


def mesh_of(args: argparse.Namespace) -> Any:
    """The mesh `--mesh` names over this process's devices, or None."""
    if not getattr(args, "mesh", None):
        return None
    from ..parallel import make_mesh, parse_mesh

    return make_mesh(*parse_mesh(args.mesh))


def start_cluster(args: argparse.Namespace) -> bool:
    """Join the processes the flags (or environment) name, before any JAX work; True in a cluster."""
    from ..parallel import cluster_from, initialize

    cluster = cluster_from(args.coordinator, args.num_processes, args.process_id, args.dist_timeout,
                           collective_timeout=args.timeout)
    initialize(cluster)
    if cluster is not None:
        _native_stdout_to_stderr()
    return cluster is not None


def _native_stdout_to_stderr() -> None:
    """Keep stdout for our own output: gloo (C++) prints connection notes such as "[Gloo] Rank 1
    is connected to 1 peer ranks" on file descriptor 1, which would corrupt `--json`. Descriptor 1
    becomes stderr; Python's `sys.stdout` keeps writing to the real stdout."""
    import os

    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")


def add_score_parsers(sub: Any, model_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    pp = sub.add_parser("perplexity", help="perplexity of a text file, exactly as llama-perplexity computes it")
    model_arg(pp)
    _common(pp)
    pp.add_argument("--weights", "--dtype", dest="dtype", default="native", choices=DTYPES, help=SCORING_HELP)
    pp.add_argument("--act-quant", action="store_true", help="emulate llama.cpp's activation quantization")
    pp.add_argument("--llamacpp", action="store_true",
                    help="compute it with llama.cpp instead (F32 KV cache, flash attention off), for comparison")
    pp.add_argument("--threads", type=int, default=None, help="llama.cpp threads with --llamacpp (all cores)")
    add_control_vector_args(pp)

    kl = sub.add_parser("kl-divergence", help="KL divergence of a model's predictions from a base run's, "
                                              "with llama-perplexity --kl-divergence's statistics")
    kl.add_argument("--base", metavar="PATH", help="GGUF of the base run (default: the --model file)")
    model_arg(kl)
    _common(kl)
    kl.add_argument("--weights", "--dtype", dest="dtype", default="native", choices=DTYPES,
                    help="model run's " + SCORING_HELP)
    kl.add_argument("--base-weights", "--base-dtype", dest="base_dtype", default="native", choices=DTYPES,
                    help="base run's weight layout (native)")
    kl.add_argument("--act-quant", action="store_true", help="model run: emulate llama.cpp's activation quantization")
    kl.add_argument("--base-act-quant", action="store_true", help="base run: emulate llama.cpp's activation quantization")
    src = kl.add_mutually_exclusive_group()
    src.add_argument("--base-llamacpp", action="store_true",
                     help="the base run is llama.cpp on the base file (F32 KV cache, flash attention off)")
    src.add_argument("--base-logprobs", metavar="FILE.npz", help="base log-probs saved earlier with --save-base")
    kl.add_argument("--save-base", metavar="FILE.npz", help="save the base run's log-probs for reuse")
    kl.add_argument("--threads", type=int, default=None, help="llama.cpp threads with --base-llamacpp (all cores)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", required=True, metavar="TEXT", help="UTF-8 text file to score")
    p.add_argument("--ctx", required=True, type=int, metavar="N", help="tokens per chunk; positions N/2..N-2 are scored")
    p.add_argument("--chunks", type=int, metavar="K", help="score only the first K chunks (default: all)")
    p.add_argument("--batch", type=int, metavar="B", help="chunks per forward (default: about 512 tokens' worth)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a reproduce block")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_arg(p)
    add_cluster_args(p)


class _Bar:
    """A tqdm bar on stderr, created on the first update; nothing at all when stderr is not a terminal."""

    def __init__(self, quiet: bool, desc: str, metric: str):
        self.enabled = not quiet and sys.stderr.isatty()
        self.desc, self.metric, self.bar = desc, metric, None

    def __call__(self, done: int, total: int, value: float) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="chunk", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"{self.metric} {value:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_threads(n: int | None) -> None:
    if n is not None and n < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {n}")


def _check_positive(args: argparse.Namespace) -> None:
    if args.batch is not None and args.batch < 1:
        raise InvalidInputError(f"--batch must be >= 1, got {args.batch}")
    if args.chunks is not None and args.chunks < 1:
        raise InvalidInputError(f"--chunks must be >= 1, got {args.chunks}")
    _check_threads(args.threads)


def _gguf_path(arg: str | None, what: str) -> Path:
    from ..gguf.default_model import resolve_model

    if arg is None:
        return resolve_model(None)
    p = resolve_model(arg)
    if p.is_dir():
        raise InvalidInputError(f"{what}: {p} is a directory, not a GGUF file")
    if not p.is_file():
        raise InvalidInputError(f"{what}: {p}: no such file")
    return p


def _load(path: Path, dtype: str, act_quant: bool, mesh: Any = None, allow_nonfinite: bool = False) -> Any:
    from ..loader import load
    from ..parallel import check_same_file

    model = load(path, dtype=dtype, mesh=mesh, allow_nonfinite=allow_nonfinite)
    check_same_file(model.sha256)  # every process must hold the same file (a no-op in one process)
    return model.with_act_quant() if act_quant else model


def _file_settings(args: argparse.Namespace) -> dict[str, Any]:
    from ..gguf.default_model import sha256_file

    return {"file": str(args.file), "file_sha256": sha256_file(Path(args.file)), "ctx": args.ctx,
            "chunks": args.chunks, "batch": args.batch}


def cmd_perplexity(args: argparse.Namespace) -> int:
    from ..provenance import provenance
    from ..scoring.perplexity import perplexity, read_text

    t0 = time.perf_counter()
    _check_positive(args)
    text = read_text(args.file)
    path = _gguf_path(args.model, "--model")
    if start_cluster(args) and args.llamacpp:
        raise InvalidInputError("--llamacpp runs in one process; leave out --coordinator")
    bar = _Bar(args.quiet, "perplexity", "ppl")
    try:
        if args.llamacpp:
            if args.control_vector:
                raise InvalidInputError("--control-vector applies to jaxllama's run; leave out --llamacpp")
            from ..gguf.config import LlamaConfig
            from ..gguf.default_model import sha256_file
            from ..gguf.reader import read_gguf
            from ..scoring.llamacpp import llamacpp_perplexity

            r = llamacpp_perplexity(path, text, args.ctx, args.chunks, args.threads, args.batch, progress=bar)
            who = SimpleNamespace(source=path, sha256=sha256_file(path), dtype="llama.cpp",
                                  config=LlamaConfig.from_gguf(read_gguf(path)))
        else:
            who = with_control_vectors(_load(path, args.dtype, args.act_quant, mesh_of(args), args.allow_nonfinite),
                                       args)
            r = perplexity(who, text, args.ctx, args.chunks, args.batch, progress=bar)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if not _prints():
        return 0
    if args.json:
        settings = _file_settings(args) | {"engine": "llama.cpp" if args.llamacpp else "jaxllama",
                                           "act_quant": args.act_quant, "batch_used": r.batch_size}
        out = r.as_dict() | {"wall_s": round(wall, 3), "reproduce": provenance(who, None, **settings)}
        print(json.dumps(out))
        return 0
    print(f"PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}  ({r.n_chunks} chunks of {r.ctx} tokens, "
          f"{r.nll.size} scored; {r.n_tokens} tokens at {r.tok_s:.1f} tok/s, compile {r.compile_s:.2f} s, "
          f"wall {wall:.2f} s)")
    return 0


def cmd_kl_divergence(args: argparse.Namespace) -> int:
    from ..provenance import provenance
    from ..scoring.kld import LlamaCppBase, SavedBase, check_save_path, kl_divergence
    from ..scoring.perplexity import read_text

    t0 = time.perf_counter()
    _check_positive(args)
    if args.save_base is not None:
        check_save_path(args.save_base)
    text = read_text(args.file)
    model_path = _gguf_path(args.model, "--model")
    start_cluster(args)
    mesh = mesh_of(args)
    if args.base_logprobs is not None:
        if args.base is not None:
            raise InvalidInputError("--base-logprobs replaces the base run; leave out --base")
        base: Any = SavedBase(args.base_logprobs)
    else:
        base_path = _gguf_path(args.base, "--base") if args.base is not None else model_path
        if args.base_llamacpp:
            base = LlamaCppBase(base_path, args.threads)
        else:
            base = _load(base_path, args.base_dtype, args.base_act_quant, mesh, args.allow_nonfinite)
    model = _load(model_path, args.dtype, args.act_quant, mesh, args.allow_nonfinite)
    bar = _Bar(args.quiet, "kl-divergence", "kld")
    try:
        r = kl_divergence(base, model, text, args.ctx, args.chunks, args.batch, progress=bar, save_base=args.save_base)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if not _prints():
        return 0
    if args.json:
        settings = _file_settings(args) | {"act_quant": args.act_quant, "base": r.base,
                                           "base_settings": {"dtype": args.base_dtype, "act_quant": args.base_act_quant}}
        print(json.dumps(r.as_dict() | {"wall_s": round(wall, 3), "reproduce": provenance(model, None, **settings)}))
        return 0
    print(report(r.summary, r.base, wall))
    if args.save_base:
        print(f"saved the base log-probs to {args.save_base}", file=sys.stderr)
    return 0


def _prints() -> bool:
    """Whether this process prints the result (process 0, or the only one)."""
    from ..parallel import is_main

    return is_main()


def report(s: dict[str, Any], base: dict[str, Any], wall: float) -> str:
    """llama-perplexity --kl-divergence's final report, from `kl_summary`'s dict."""
    pm = "\u00b1"
    kp, dp = s["kld_percentiles"], s["delta_p"]
    lines = [
        f"base: {base.get('kind')} {base.get('path', '')}",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f} {pm} {s['ppl_err']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f} {pm} {s['ppl_base_err']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor_log_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['log_ppl_ratio']:10.6f} {pm} {s['log_ppl_ratio_err']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} {pm} {s['ppl_ratio_err']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} {pm} {s['kld_err']:10.6f}",
    ]
    for k in ("max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"):
        label = {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(k, f"{k + '%':<7}")
        lines.append(f"{label} KLD: {kp[k]:10.6f}")
    lines += ["", "====== Token probability statistics ======",
              f"Mean    \u0394p: {100 * dp['mean']:6.3f} {pm} {100 * dp['mean_err']:5.3f} %"]
    for k in ("max", "99.9", "99", "95", "90", "75", "median", "25", "10", "5", "1", "0.1", "min"):
        label = {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(k, f"{k + '%':<7}")
        lines.append(f"{label} \u0394p: {100 * dp['percentiles'][k]:6.3f}%")
    lines += [f"RMS \u0394p    : {100 * dp['rms']:6.3f} {pm} {100 * dp['rms_err']:5.3f} %",
              f"Same top p: {100 * s['same_top_rate']:6.3f} {pm} {100 * s['same_top_err']:5.3f} %",
              f"({s['n_scored']} positions; wall {wall:.2f} s)"]
    return "\n".join(lines)
