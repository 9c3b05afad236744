"""The kept conversions (`jaxllama/gguf/converted.py`): a second load of the same GGUF reads the
arrays the first one converted, bit for bit the same parameters; a changed file, another layout, a
damaged entry or `JAXLLAMA_CONVERTED_CACHE=0` convert anew; and the load's memory stays bounded
either way (default model)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxllama
from jaxllama.gguf import converted
from jaxllama import loader
from test_model import TOKENS
from tiny_models import TinySpec, T


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty jaxllama cache in which every file's conversion is kept (tiny ones too), and a
    count of the conversions that ran."""
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(converted, "MIN_BYTES", 0)
    runs = []
    real = loader.params_from_gguf

    def counted(*args, **kwargs):
        runs.append(args[2] if len(args) > 2 else kwargs.get("weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "params_from_gguf", counted)
    return runs


def _leaves(model):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(model.params)}


def _same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_second_load_reads_the_kept_conversion_bit_for_bit(cache, tiny_factory, qtype):
    path = tiny_factory(TinySpec(matrix_type=qtype, embd_type=qtype), 3)
    first = jaxllama.load(path)
    second = jaxllama.load(path)
    assert cache == ["native"]  # converted once
    _same_bits(_leaves(first), _leaves(second))
    np.testing.assert_array_equal(second.logits(TOKENS), first.logits(TOKENS))
    assert second.weights == "native" and jaxllama.load(path, weights="float32").weights == "float32"
    assert cache == ["native", "float32"]  # the float32 layout is not kept


def test_a_changed_file_is_converted_again(cache, tiny_factory, tmp_path):
    src = tiny_factory(TinySpec(matrix_type=T.Q8_0), 4)
    path = tmp_path / "model.gguf"
    path.write_bytes(src.read_bytes())
    before = _leaves(jaxllama.load(path))
    other = tiny_factory(TinySpec(matrix_type=T.Q8_0), 5)  # same shapes and size, other weights
    path.write_bytes(other.read_bytes())
    os.utime(path, ns=(1, 1))  # even an older modification time: the key changes
    after = _leaves(jaxllama.load(path))
    assert len(cache) == 2
    _same_bits(after, _leaves(jaxllama.load(other)))
    assert any(before[k].tobytes() != after[k].tobytes() for k in before)


def test_a_damaged_entry_is_converted_again(cache, tiny_factory):
    path = tiny_factory(TinySpec(matrix_type=T.Q4_0), 6)
    want = _leaves(jaxllama.load(path))
    entry = converted.entry_dir(path, "native", 0)
    manifest = json.loads((entry / converted.MANIFEST).read_text())
    victim = entry / manifest["arrays"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-8])  # a truncated array
    _same_bits(_leaves(jaxllama.load(path)), want)
    assert len(cache) == 2
    _same_bits(_leaves(jaxllama.load(path)), want)  # the entry was written again
    assert len(cache) == 2
    (entry / converted.MANIFEST).write_text('{"format": 1, "arrays": [{"key": "x", "file": "../../model.gguf"}]}')
    _same_bits(_leaves(jaxllama.load(path)), want)  # reads only its own files
    assert len(cache) == 3
    (entry / converted.MANIFEST).write_text("{not json")
    _same_bits(_leaves(jaxllama.load(path)), want)
    assert len(cache) == 4


def test_switched_off_and_small_files_are_not_kept(cache, tiny_factory, monkeypatch):
    path = tiny_factory(TinySpec(matrix_type=T.Q8_0), 7)
    monkeypatch.setenv("JAXLLAMA_CONVERTED_CACHE", "0")
    jaxllama.load(path)
    jaxllama.load(path)
    assert len(cache) == 2
    monkeypatch.delenv("JAXLLAMA_CONVERTED_CACHE")
    monkeypatch.setattr(converted, "MIN_BYTES", 16 * 2**20)  # the tiny file is below the real threshold
    jaxllama.load(path)
    jaxllama.load(path)
    assert len(cache) == 4
    assert not (converted.entry_dir(path, "native", 2**30).parent).exists()


@pytest.mark.parametrize("kept", [False, True], ids=["converting", "kept"])
def test_load_returns_the_conversions_memory(default_gguf, tmp_path, kept):
    """After `load` the process holds the parameters, not the conversion's freed temporaries
    (glibc kept ~120 MB of them; measured 1.82x the parameters' bytes over the pre-load RSS
    before `release_freed_memory`, 1.33x after), whether it converted or read a kept
    conversion (then 1.0x: the arrays it read are freed). Bounds memory, not time."""
    code = ("import json, sys, jax, jaxllama\n"
            "from jaxllama.benchmark import peak_rss_mb\n"
            "jax.numpy.zeros(1).block_until_ready()\n"
            "base = peak_rss_mb('VmRSS')\n"
            "m = jaxllama.load(sys.argv[1])\n"
            "print(json.dumps([base, peak_rss_mb('VmRSS'), sum(x.nbytes for x in jax.tree.leaves(m.params)) / 2**20]))")
    env = {**os.environ, "JAXLLAMA_CACHE": str(tmp_path), "JAXLLAMA_CONVERTED_CACHE": "1" if kept else "0"}
    for _ in range(2 if kept else 1):  # kept: the first run converts and keeps, the second reads
        done = subprocess.run([sys.executable, "-c", code, str(default_gguf)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "converted").exists() == kept
    base, after, params_mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert after - base <= 1.5 * params_mb, (base, after, params_mb)
