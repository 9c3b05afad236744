"""Many processes with jax.distributed (gloo collectives on CPU): real local processes started by
the test on a free port, each with 2 simulated CPU devices, killed on failure; bad cluster input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxllama
from jaxllama.cli.main import main
from jaxllama.errors import InvalidInputError
from jaxllama.parallel import cluster_from, share
from texts import licence_text  # noqa: F401  (conftest puts tests/ on sys.path)

ROOT = Path(jaxllama.__file__).resolve().parent.parent  # the tree under test, for the subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cluster(args_of: list[list[str]], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start one `jaxllama` process per argument list (2 simulated devices each) and wait for all;
    every process still running is killed when the wait fails."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxllama", *a], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args_of]
    done = []
    try:
        for p, a in zip(procs, args_of):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(a, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def cluster_flags(port: int, n: int, i: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i), "--dist-timeout", "60"]


def test_two_processes_compute_the_single_process_perplexity(tmp_path, default_model, default_gguf):
    text = tmp_path / "gpl.txt"
    text.write_text(licence_text()[:6000], encoding="utf-8")
    port = free_port()
    common = ["perplexity", "--model", str(default_gguf), "--file", str(text), "--ctx", "128", "--chunks", "5",
              "--mesh", "2x1", "--json", "--quiet"]
    r0, r1 = run_cluster([common + cluster_flags(port, 2, i) for i in range(2)])
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-2000:], r1.stderr[-2000:])
    assert r1.stdout == ""  # only process 0 prints
    got = json.loads(r0.stdout)
    want = jaxllama.perplexity(default_model, licence_text()[:6000], ctx=128, chunks=5)
    assert got["n_chunks"] == want.n_chunks == 5  # shares of 2 and 3 chunks, gathered
    assert abs(got["ppl"] / want.ppl - 1) <= 1e-6
    assert abs(got["ppl_err"] / want.ppl_err - 1) <= 1e-5


def test_mismatched_model_files_are_refused(tmp_path, tiny_factory):
    from tiny_models import TinySpec

    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20, encoding="utf-8")
    port = free_port()
    models = [tiny_factory(TinySpec(), seed=0), tiny_factory(TinySpec(), seed=1)]
    runs = run_cluster([["perplexity", "--model", str(m), "--file", str(text), "--ctx", "16", "--quiet"]
                        + cluster_flags(port, 2, i) for i, m in enumerate(models)])
    for r in runs:
        assert r.returncode == 1, r.stderr[-2000:]
        assert "different model files" in r.stderr and "process 0: " in r.stderr and "process 1: " in r.stderr
        assert "Traceback" not in r.stderr


def test_unreachable_coordinator_is_a_clear_error_not_a_hang(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20, encoding="utf-8")
    port = free_port()  # nothing listens there
    code = main(["perplexity", "--file", str(text), "--ctx", "16", "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", "1", "--dist-timeout", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"coordinator 127.0.0.1:{port} unreachable after 1 s" in err and err.count("\n") == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator": "h:1", "num_processes": 2}, "go together"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "expected HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "--process-id must be in [0, 2)"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "--num-processes must be >= 1"),
])
def test_bad_cluster_settings(kwargs, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        cluster_from(env={}, **kwargs)


def test_cluster_from_the_environment():
    env = {"JAXLLAMA_COORDINATOR": "10.0.0.1:1234", "JAXLLAMA_NUM_PROCESSES": "4", "JAXLLAMA_PROCESS_ID": "3"}
    c = cluster_from(env=env)
    assert (c.coordinator, c.num_processes, c.process_id) == ("10.0.0.1:1234", 4, 3)
    assert cluster_from(env={}) is None


def test_shares_cover_every_item_once():
    for n in (0, 1, 5, 17):
        for k in (1, 2, 3, 8):
            items = [i for p in range(k) for i in share(n, p, k)]
            assert items == list(range(n))


def test_processes_scoring_other_texts_are_stopped_with_the_process_named(tmp_path, tiny_gguf):
    port = free_port()
    texts = []
    for i, body in enumerate(("abcdefghij" * 20, "Xbcdefghij" + "abcdefghij" * 19)):
        texts.append(tmp_path / f"t{i}.txt")
        texts[-1].write_text(body, encoding="utf-8")
    runs = run_cluster([["perplexity", "--model", str(tiny_gguf), "--file", str(t), "--ctx", "16", "--quiet"]
                        + cluster_flags(port, 2, i) for i, t in enumerate(texts)])
    for r in runs:
        assert r.returncode == 1, r.stderr[-2000:]
        assert "process 1 would score other texts or settings than process 0" in r.stderr
        assert "Traceback" not in r.stderr


STALLING_PEER = """
import sys, time
from jaxllama.parallel import cluster_from, initialize
initialize(cluster_from(sys.argv[1], 2, 1, 60))
if sys.argv[2] == "stall":
    time.sleep(600)
"""


@pytest.mark.parametrize("peer", ["stall", "die"])
def test_a_stalled_or_dead_peer_stops_the_others_within_the_timeout(tmp_path, tiny_gguf, peer):
    """Process 1 joins, then never takes part (or exits): process 0 stops with one line after
    --timeout seconds, never hangs."""
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p0 = subprocess.Popen([sys.executable, "-m", "jaxllama", "perplexity", "--model", str(tiny_gguf), "--file",
                           str(text), "--ctx", "16", "--quiet", "--timeout", "5", *cluster_flags(port, 2, 0)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p1 = subprocess.Popen([sys.executable, "-c", STALLING_PEER, f"127.0.0.1:{port}", peer], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p0.communicate(timeout=120)  # joining takes some seconds; then 5 s at most
    finally:
        for p in (p0, p1):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p0.returncode != 0 and out == ""
    assert "Traceback" not in err
    if peer == "stall":
        assert p0.returncode == 1
        assert "process 0: no answer from the other processes within 5 s" in err


def test_gathered_rows_keep_their_dtype_bit_for_bit():
    from jaxllama.parallel.distributed import _unwire, _wire

    a = np.array([[1 / 3, 1e-300], [np.pi, -0.0]], np.float64)
    w = _wire(a)
    assert w.dtype == np.uint32
    back = _unwire(w, a)
    assert back.dtype == np.float64 and back.tobytes() == a.tobytes()
    flags = np.array([True, False])
    assert _unwire(_wire(flags), flags).tolist() == [True, False]
