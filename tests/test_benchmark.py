"""`jaxllama bench`: what it measures must mean what it says (speed itself is never asserted)."""

import subprocess
import sys

import numpy as np
import pytest

from jaxllama.benchmark import parse_sections, peak_rss_mb
from jaxllama.errors import InvalidInputError


def test_child_peak_rss_is_its_own_not_the_parents():
    """ru_maxrss survives fork and exec on Linux; the benchmark's children must not report it."""
    ballast = np.ones(300 * 2**20 // 8)  # 300 MB resident in this (parent) process
    parent = peak_rss_mb()
    code = "from jaxllama.benchmark import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert parent >= 300 and child < parent - 250, (parent, child)
    assert ballast.sum() > 0


def test_sections_are_checked():
    assert parse_sections("prefill, scoring") == ("prefill", "scoring")
    with pytest.raises(InvalidInputError, match="--only: unknown section 'prefil'"):
        parse_sections("prefil")
