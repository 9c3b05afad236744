"""Save a converted model and load it back without dequantizing."""

import jax
import numpy as np
import pytest

import jaxllama
from jaxllama import GGUFFormatError


def test_save_and_reload_is_identical(tmp_path, tiny_factory):
    from tiny_models import TinySpec
    import gguf

    m = jaxllama.load(tiny_factory(TinySpec(matrix_type=gguf.GGMLQuantizationType.Q4_1, tied=False)))
    path = m.save(tmp_path / "m.msgpack")
    r = jaxllama.load(path)
    assert r.config == m.config and r.sha256 == m.sha256
    assert jax.tree.structure(r.params) == jax.tree.structure(m.params)
    for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(m.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert r.metadata["tokenizer.ggml.tokens"] == m.metadata["tokenizer.ggml.tokens"]
    np.testing.assert_array_equal(r.logits([1, 2, 3]), m.logits([1, 2, 3]))


def test_damaged_saved_file(tmp_path, tiny_gguf):
    path = jaxllama.load(tiny_gguf).save(tmp_path / "m.msgpack")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(GGUFFormatError, match="damaged jaxllama parameter file"):
        jaxllama.load(path)
