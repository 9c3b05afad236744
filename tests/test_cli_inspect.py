"""`jaxllama trace` from the command line."""

import json
import subprocess
import sys

import numpy as np

import jaxllama
from jaxllama.tracing.probes import statistics_numpy


def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxllama", *map(str, args)], capture_output=True, text=True)


def test_trace_table_and_plot(tiny_gguf, tmp_path):
    plot = tmp_path / "rms.png"
    done = run("trace", "--model", tiny_gguf, "--tokens", "1,2,3,4", "--plot", plot)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:6] == ["layer", "probe", "rms", "min", "max", "mean"]
    assert sum(1 for l in lines if l.split()[:2] == ["1", "l_out"]) == 1
    assert "no NaN/Inf" in lines[-1]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_trace_json_statistics_are_right(tiny_gguf):
    done = run("trace", "--model", tiny_gguf, "--tokens", "5,6,7", "--probes", "result_output", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    (rec,) = out["records"]
    assert rec["probe"] == "result_output" and rec["layer"] is None
    want = statistics_numpy(jaxllama.load(tiny_gguf).logits([5, 6, 7]))
    for k in ("rms", "min", "max", "mean"):
        assert abs(rec[k] - want[k]) <= 1e-5 * max(abs(want[k]), want["rms"])
    rep = out["reproduce"]
    assert rep["tokens"] == [5, 6, 7] and rep["config"]["n_layer"] == 2 and len(rep["model"]["sha256"]) == 64
    assert rep["versions"]["jax"]


def test_trace_bad_arguments(tiny_gguf):
    for args, words in [
        (["--probes", "ffn_outt"], "unknown probe 'ffn_outt'; valid probes: inp_embd"),
        (["--layers", "0,9"], "layer 9 out of range; valid layers: 0..1"),
        (["--layers", "a-b"], "--layers: 'a-b' is not a layer number"),
    ]:
        done = run("trace", "--model", tiny_gguf, "--tokens", "1,2", *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxllama: error: ")
        assert words in done.stderr
    done = run("trace", "--model", tiny_gguf, "--tokens", "1", "--chat")
    assert done.returncode == 1 and "--chat needs --prompt" in done.stderr
