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


def _entry(path):
    return converted.entry_dir(path, "native", 0, jaxllama.read_gguf(path).stat)


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
    entry = _entry(path)
    manifest = json.loads((entry / converted.MANIFEST).read_text())
    victim = entry / manifest["arrays"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-8])  # a truncated array
    _same_bits(_leaves(jaxllama.load(path)), want)
    assert len(cache) == 2
    _same_bits(_leaves(jaxllama.load(path)), want)  # the entry was written again
    assert len(cache) == 2
    (entry / converted.MANIFEST).write_text('{"format": 2, "arrays": [{"key": "x", "file": "../../model.gguf"}]}')
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
    assert not converted.root().exists()


def test_a_flipped_byte_is_caught_by_its_checksum_and_said_in_one_line(cache, tiny_factory, capfd):
    path = tiny_factory(TinySpec(matrix_type=T.Q8_0), 8)
    want = _leaves(jaxllama.load(path))
    entry = _entry(path)
    victim = max(entry.glob("*.npy"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x10  # same size, same header: only the checksum can tell
    victim.write_bytes(bytes(data))
    capfd.readouterr()
    _same_bits(_leaves(jaxllama.load(path)), want)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0] and "checksum" in err[0] and victim.name in err[0]
    assert len(cache) == 2
    _same_bits(_leaves(jaxllama.load(path)), want)  # rebuilt: read, not converted, the third time
    assert len(cache) == 2


def test_an_in_place_edit_with_its_mtime_restored_is_converted_again(cache, tiny_factory, tmp_path):
    """Only ctime tells: same path, inode, size and mtime (restored with utime), other bytes."""
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_factory(TinySpec(matrix_type=T.Q8_0), 9).read_bytes())
    st = path.stat()
    before = _leaves(jaxllama.load(path))
    other = tiny_factory(TinySpec(matrix_type=T.Q8_0), 10)
    with open(path, "r+b") as fh:  # in place: the inode stays
        fh.write(other.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    after = _leaves(jaxllama.load(path))
    assert len(cache) == 2
    _same_bits(after, _leaves(jaxllama.load(other)))
    assert any(before[k].tobytes() != after[k].tobytes() for k in before)


def test_four_processes_loading_one_new_file_at_once(tmp_path, tiny_factory):
    """All get the same weights; the lock makes one convert while the others wait and read its
    entry; one entry remains, no temporary directory."""
    path = tiny_factory(TinySpec(matrix_type=T.Q4_0), 11)
    code = ("import sys, hashlib, jax, numpy as np, jaxllama\n"
            "from jaxllama.gguf import converted\n"
            "converted.MIN_BYTES = 0\n"
            "m = jaxllama.load(sys.argv[1])\n"
            "h = hashlib.sha256()\n"
            "for leaf in jax.tree.leaves(m.params): h.update(np.asarray(leaf).tobytes())\n"
            "print(h.hexdigest())")
    env = {**os.environ, "JAXLLAMA_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    assert all(o[1] == "" for o in outs)  # no process saw a damaged entry
    kept = tmp_path / "cache" / "converted"
    assert len([d for d in kept.iterdir() if d.is_dir()]) == 1


def test_leftovers_of_killed_writers_are_removed(cache, tiny_factory):
    path = tiny_factory(TinySpec(matrix_type=T.Q8_0), 12)
    where = _entry(path).parent
    where.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = where / f"{converted.PARTIAL}{int(dead.stdout)}-abc"
    live = where / f"{converted.PARTIAL}{os.getpid()}-def"
    for d in (stale, live):
        d.mkdir()
        (d / "0.npy").write_bytes(b"x")
    jaxllama.load(path)
    assert not stale.exists() and live.exists()  # a running writer's directory stays


def test_the_cache_is_held_under_its_limit_least_recently_used_first(cache, tiny_factory, monkeypatch):
    a, b, c = (tiny_factory(TinySpec(matrix_type=T.Q8_0), s) for s in (13, 14, 15))
    jaxllama.load(a)
    size = converted.entries()[0].bytes
    monkeypatch.setenv("JAXLLAMA_CACHE_MAX", str(int(2.5 * size)))
    jaxllama.load(b)
    os.utime(_entry(a) / converted.MANIFEST, (1, 1))  # a: used long ago
    jaxllama.load(c)  # three do not fit: the least recently used one goes
    left = {e.path for e in converted.entries()}
    assert left == {_entry(b), _entry(c)}


@pytest.mark.parametrize("kept", [False, True], ids=["converting", "kept"])
def test_load_returns_the_conversions_memory(default_gguf, tmp_path, kept):
    """After `load` the process holds the parameters, not the conversion's freed temporaries
    (glibc kept ~120 MB of them; measured 1.82x the parameters' bytes over the pre-load RSS
    before `release_freed_memory`, 1.33x after), whether it converted or read a kept
    conversion (then 1.0x: the arrays it read are freed). Bounds memory, not time."""
    code = ("import json, sys, jax, jaxllama\n"
            "from jaxllama.bench import peak_rss_mb\n"
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


def test_cache_command_lists_and_prunes(cache, tiny_factory, tmp_path, capsys):
    from jaxllama.cli.main import main

    a, b = tiny_factory(TinySpec(matrix_type=T.Q8_0), 16), tiny_factory(TinySpec(matrix_type=T.Q8_0), 17)
    jaxllama.load(a)
    jaxllama.load(b)
    root = tmp_path / "cache"
    (root / "xla").mkdir()
    (root / "xla" / "program").write_bytes(b"x" * 1000)
    (root / "model.gguf").write_bytes(b"GGUF" * 10)  # a download: listed, never pruned

    def run(*args):
        code = main(["cache", "--json", *args])
        return code, json.loads(capsys.readouterr().out)

    code, out = run()
    kinds = sorted(i["kind"] for i in out["items"])
    assert code == 0 and kinds == ["conversion", "conversion", "download", "xla"]
    assert {i["model"] for i in out["items"] if i["kind"] == "conversion"} == {str(a), str(b)}
    os.utime(_entry(a) / converted.MANIFEST, (1, 1))
    code, out = run("--older-than", "30d")
    assert [i["model"] for i in out["pruned"]] == [str(a)] and not _entry(a).exists() and _entry(b).exists()
    code, out = run("--max-size", "0")
    assert sorted(i["kind"] for i in out["pruned"]) == ["conversion", "xla"]
    assert [i["kind"] for i in out["items"]] == ["download"] and (root / "model.gguf").exists()
    for bad, words in (["--max-size", "lots"], "--max-size: 'lots' is not a size"), \
                      (["--older-than", "soon"], "--older-than: 'soon' is not an age"):
        assert main(["cache", *bad]) == 1
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
