"""Sharded models (jaxllama.parallel): meshes, the sharding table, the memory estimate, and
sharded-versus-one-device runs in subprocesses with simulated CPU devices (XLA_FLAGS must be set
before jax starts), one subprocess per model and device count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

import jaxllama
from jaxllama import parallel
from jaxllama.errors import InvalidInputError
from jaxllama.parallel import CONFIGS, memory_per_device, memory_table
from jaxllama.parallel.memory import leaves
from tiny_models import T, TinySpec

ROOT = Path(jaxllama.__file__).resolve().parent.parent
TINY4 = TinySpec(n_head=8, n_head_kv=4, head_dim=16, d_model=64, d_ff=384, matrix_type=T.Q8_0, context=64)
# every split matrix of TINY4 at full size ([L, out, in] and [L, in, out]): none may exist as a buffer
TINY4_MATRICES = [[2, 384, 64], [2, 64, 384], [2, 128, 64], [2, 64, 128]]


def run_worker(job: dict, devices: int, tmp_path: Path) -> dict:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "parallel_worker.py"), str(spec)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_tiny_model_with_4_kv_heads_on_4_devices(tmp_path, tiny_factory):
    path = tiny_factory(TINY4)
    job = {"path": str(path), "weights": "native", "t": 8, "ragged": [5, 9, 3], "generate": 4, "ppl_tokens": 256,
           "ctx": 32, "ppl_batch": 4, "trace": True, "hlo": TINY4_MATRICES, "meshes": [[4, 1], [1, 4], [2, 2]]}
    out = run_worker(job, 4, tmp_path)
    # positive control: on one device the full matrices are there, so the check can see them
    assert {"s8[2,384,64]", "s8[2,64,384]", "s8[2,128,64]", "s8[2,64,128]"} <= set(out["reference_hlo"])
    for mesh in ("4x1", "1x4", "2x2"):
        r = out[mesh]
        assert r["one"] <= 1e-5 and r["batch"] <= 1e-5 and r["batch_rows"] == 3, (mesh, r)
        assert r["gen_same"], mesh
        assert r["kernel_calls"] == 0, mesh  # no single-device CPU kernel in the decode step on a mesh
        # float32 noise: each device multiplies other shapes (blocked differently) than one device does
        assert r["ppl_rel"] <= 1e-5, (mesh, r)
        t = r["trace"]  # the same records, each exactly once, with the whole tensor's statistics
        assert t["same_keys"] and t["n_got"] == t["n_ref"] == 3 * (2 * 3 + 1) and t["max_count"] == 1, (mesh, t)
        assert t["stat_rel"] <= 1e-5, (mesh, t)
    for mesh in ("1x4", "2x2"):
        assert out[mesh]["hlo"] == [], (mesh, out[mesh]["hlo"])  # no full-size copy of a split matrix
        assert out[mesh]["ffn_gate_spec"] == "P(None, 'model', None)"


def reorder_bound(c) -> float:
    """Worst-case relative change of the logits when every float32 sum of the forward is added in
    another order (what a split matrix or another blocking does), derived from the arithmetic, not
    measured: a sum of K products in any order is within gamma_K = K u / (1 - K u) of the exact sum
    relative to the sum of |products| (Higham, Accuracy and Stability, 3.1), so two orders differ
    by at most 2 gamma_K; each layer adds one such change to the residual stream (normalised
    again by the next RMSNorm), taken at the longest dot product a layer has (K = max(width, FFN
    width, query width); these tests' attention sums over at most 64 positions, fewer). No machine's noise enters it, so it holds on every CPU; a wrong shard moves logits
    by O(1), far above it."""
    u = 2.0 ** -24
    k = max(c.d_model, c.d_ff, c.n_head * c.head_dim)
    return c.n_layer * 2 * (k * u / (1 - k * u))


def test_default_model_on_6_devices(tmp_path, default_gguf):
    job = {"path": str(default_gguf), "t": 8, "ragged": [5, 9, 3], "generate": 4, "ppl_tokens": 256, "ctx": 64,
           "ppl_batch": 6, "trace": True, "meshes": [[6, 1], [2, 3], [1, 3]],
           "full_on": [[6, 1], [2, 3]]}  # (1,3) splits the matrices as (2,3) does: logits and perplexity only
    out = run_worker(job, 6, tmp_path)
    bound = reorder_bound(jaxllama.gguf.LlamaConfig.from_gguf(jaxllama.gguf.read_gguf(default_gguf)))
    assert 1e-3 < bound < 1e-2  # 30 layers x 2 gamma_1536: about 5.5e-3
    for mesh in ("6x1", "2x3", "1x3"):
        r = out[mesh]
        assert r["one"] <= bound and r["batch_rows"] == 3, (mesh, r)
        if mesh != "1x3":
            assert r["gen_same"], mesh
            assert r["kernel_calls"] == 0, mesh
            t = r["trace"]
            assert t["same_keys"] and t["n_got"] == t["n_ref"] and t["max_count"] == 1, (mesh, t)
            assert t["stat_rel"] <= bound, (mesh, t)  # statistics relative to each tensor's rms
        if mesh == "6x1":  # rows over devices: the same sums in the same order, the same numbers
            assert r["batch"] <= 1e-5 and r["ppl_rel"] <= 1e-6, r
        else:  # split matrices add partial sums in another order
            assert r["batch"] <= bound, (mesh, r)
            # each NLL moves by at most 2 max|dlogit| (the target's and the log-sum-exp's), so the
            # perplexity by at most expm1(2 * bound * max|logit|) relative
            assert r["ppl_rel"] <= np.expm1(2 * bound * out["logit_scale"]), (mesh, r)


# ---- in this process (one CPU device) -------------------------------------------------------------

def test_parse_and_make_mesh():
    assert parallel.parse_mesh("2x3") == (2, 3) and parallel.parse_mesh(" 1X4 ") == (1, 4)
    for bad in ("2", "0x2", "2x-1", "axb", ""):
        with pytest.raises(InvalidInputError, match="DATAxMODEL"):
            parallel.parse_mesh(bad)
    mesh = parallel.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "model") and parallel.mesh_sizes(mesh) == (1, 1)
    with pytest.raises(InvalidInputError, match="2x2 needs 4 devices, only 1"):
        parallel.make_mesh(2, 2)


def test_model_split_errors_name_the_numbers():
    c = CONFIGS["SmolLM2-135M"]  # 3 KV heads, FFN 1536
    with pytest.raises(InvalidInputError, match="model size 2 does not divide the 3 KV heads"):
        parallel.check_model_split(c, 2)
    import dataclasses

    odd_ffn = dataclasses.replace(c, n_head_kv=3, d_ff=1537)
    with pytest.raises(InvalidInputError, match="model size 3 does not divide the feed-forward width 1537"):
        parallel.check_model_split(odd_ffn, 3)
    with pytest.raises(InvalidInputError, match="attn_output's input width 576 into 192, not a multiple of its "
                                                "quantization block 256"):
        parallel.check_model_split(c, 3, block=256)
    with pytest.raises(InvalidInputError, match="ffn_down's input width 1584 into 528, not a multiple of its "
                                                "quantization block 32"):
        parallel.check_model_split(dataclasses.replace(c, d_ff=1584), 3, block=32)
    parallel.check_model_split(c, 3, block=32)


def test_the_table_covers_every_matrix_of_both_layouts(tiny_factory):
    path = tiny_factory(TINY4)
    mesh = parallel.make_mesh(1, 1)
    for weights in ("native", "float32"):
        model = jaxllama.load(path, weights=weights, mesh=mesh)
        specs = {}
        for keys, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
            specs["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys[1:])] = leaf.sharding.spec
        split = {p for p, s in specs.items() if any(a is not None for a in s)}
        names = {p.split("/")[1] for p in split if p.startswith("layers/")}
        assert names == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}, weights
        assert all(specs[p] == jax.sharding.PartitionSpec() for p in specs if "norm" in p)
        assert any(p.startswith("token_embd/") for p in split)  # vocab split by default
        for p in split:  # the layer axis stays whole
            assert not p.startswith("layers/") or specs[p][0] is None


def test_memory_matches_a_count_of_the_parameters():
    for name, c in CONFIGS.items():
        h, kv, d, f = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.d_model, c.d_ff
        matrices = c.n_layer * (2 * d * h + 2 * d * kv + 3 * d * f) + c.vocab_size * d * (1 if c.tied_output else 2)
        small = c.n_layer * 2 * d + d  # norms, float32
        assert memory_per_device(c, "float32", 1).weights == 4 * (matrices + small), name
        assert memory_per_device(c, "bfloat16", 1).weights == 2 * matrices + 4 * small, name
        # native blocks take the GGUF file's bytes (float16 scales): Q8_0's 34 and Q4_1's 20 per 32 values
        for layout, t in (("native-q8_0", gguf.GGMLQuantizationType.Q8_0), ("native-q4_1", gguf.GGMLQuantizationType.Q4_1)):
            block, size = gguf.GGML_QUANT_SIZES[t]
            assert memory_per_device(c, layout, 1).weights == matrices // block * size + 4 * small, (name, layout)
        m = memory_per_device(c, "float32", 8)
        shapes = leaves(c, "float32")
        replicated = sum(math.prod(s) for p, (s, _) in shapes.items() if "norm" in p)
        assert m.weights == 4 * (matrices // m.model + replicated), name  # every matrix split m ways
        assert m.data * m.model == 8 and c.n_head_kv % m.model == 0
    assert memory_per_device(CONFIGS["Llama-3-70B"], "float32", 64)[:2] == (8, 8)
    assert memory_per_device(CONFIGS["SmolLM2-135M"], "float32", 8)[:2] == (8, 1)  # 3 KV heads


def test_readme_memory_table_is_the_functions_output():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert memory_table() in readme


def test_readme_rules_table_is_the_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path, spec in parallel.rules_table():
        assert f"| `{path}` | `{spec}` |" in readme, path
