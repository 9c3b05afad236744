"""`jaxllama bench`: what it measures must mean what it says (speed itself is never asserted)."""

import subprocess
import sys

import numpy as np
import pytest

from jaxllama.bench import parse_sections, peak_rss_mb
from jaxllama.errors import InvalidInputError


def test_child_peak_rss_is_its_own_not_the_parents():
    """ru_maxrss survives fork and exec on Linux; the benchmark's children must not report it."""
    ballast = np.ones(300 * 2**20 // 8)  # 300 MB resident in this (parent) process
    parent = peak_rss_mb()
    code = "from jaxllama.bench import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert parent >= 300 and child < parent - 250, (parent, child)
    assert ballast.sum() > 0


def test_sections_are_checked():
    assert parse_sections("prefill, scoring") == ("prefill", "scoring")
    with pytest.raises(InvalidInputError, match="--only: unknown section 'prefil'"):
        parse_sections("prefil")


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_are_the_files_tensors(tiny_factory, tied):
    """The device section's bytes per decode step: every float32 weight once, counted from the
    GGUF's own tensor table, the embedding table left out when a separate output matrix exists
    (a step then reads one row of it per token)."""
    import gguf

    import jaxllama
    from jaxllama.bench.device import weight_bytes
    from tiny_models import TinySpec

    path = tiny_factory(TinySpec(tied=tied))
    tensors = gguf.GGUFReader(path).tensors
    want = 4 * sum(int(t.n_elements) for t in tensors if tied or t.name != "token_embd.weight")
    m = jaxllama.load(path, weights="float32")
    assert weight_bytes(m.params, m.config) == want
