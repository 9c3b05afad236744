"""Pytest hooks that keep a llama.cpp crash from taking the test run down.

Tests marked `llamacpp` run llama.cpp in this process. Before the first of them, llama.cpp runs
once in a child process (`jaxllama.reference.check_reference` on the default model). If that
child dies (SIGILL from a build for another CPU, SIGSEGV, abort), every `llamacpp` test fails
with the one-line cause and fix, and every other test still runs and reports.

`JAXLLAMA_TEST_REFERENCE_PROBE` (a shell-quoted command) replaces the child, so a test can
simulate a crash.
"""

from __future__ import annotations

import os
import shlex

import pytest

_RESULT: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "llamacpp: runs llama.cpp in-process; checked for crashes in a child first")


def reference_problem() -> str | None:
    """None when llama.cpp runs here, else the one-line reason (computed once per session)."""
    if "problem" not in _RESULT:
        from jaxllama.errors import JaxLlamaError
        from jaxllama.gguf.default_model import default_model_path
        from jaxllama.reference import check_reference

        override = os.environ.get("JAXLLAMA_TEST_REFERENCE_PROBE")
        try:
            check_reference(default_model_path(), probe=shlex.split(override) if override else None)
            _RESULT["problem"] = None
        except JaxLlamaError as e:
            _RESULT["problem"] = str(e)
    return _RESULT["problem"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("llamacpp") is not None:
        problem = reference_problem()
        if problem:
            pytest.fail(problem, pytrace=False)
