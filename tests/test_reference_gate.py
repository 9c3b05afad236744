"""A llama.cpp that crashes fails the tests that need it, with one line, and never the run;
without llama-cpp-python, compare says which extra to install."""

import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxllama.gguf.default_model import cache_dir
from jaxllama.reference import ReferenceCrashError, check_reference
from jaxllama.reference.binding import CRASH_FIX

SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
TESTS = Path(__file__).resolve().parent


def test_a_child_killed_by_sigill_gives_one_line_with_the_fix(tmp_path):
    with pytest.raises(ReferenceCrashError) as err:
        check_reference(tmp_path / "model.gguf", probe=SIGILL_CHILD)
    message = str(err.value)
    assert message.startswith(CRASH_FIX) and "SIGILL" in message and "\n" not in message


def test_a_crashing_reference_fails_only_the_tests_that_need_it(pytester, monkeypatch):
    pytester.makeconftest(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from reference_gate import pytest_configure, pytest_runtest_setup
    """)
    pytester.makepyfile(test_mixed="""
        import pytest

        @pytest.mark.llamacpp
        def test_needs_llamacpp():
            import llama_cpp  # never reached: the gate fails the test first

        @pytest.mark.llamacpp
        def test_needs_llamacpp_too():
            pass

        def test_unrelated():
            assert sum([1, 2]) == 3
    """)
    monkeypatch.setenv("JAXLLAMA_TEST_REFERENCE_PROBE", shlex.join(SIGILL_CHILD))
    monkeypatch.setenv("JAXLLAMA_CACHE", str(cache_dir()))  # pytester moves HOME; keep the model cache
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)  # failed in set-up, before any llama.cpp code ran
    reasons = [line for line in result.outlines if line.startswith(CRASH_FIX)]
    assert len(reasons) == 2 and all("SIGILL" in line for line in reasons), result.outlines
    assert result.ret == 1  # an ordinary test failure, not a crashed interpreter (132)


BLOCK_LLAMA_CPP = textwrap.dedent("""
    import sys

    class NoLlamaCpp:
        def find_spec(self, name, path=None, target=None):
            if name == "llama_cpp" or name.startswith("llama_cpp."):
                raise ModuleNotFoundError("No module named 'llama_cpp'")

    sys.meta_path.insert(0, NoLlamaCpp())
""")


def test_without_the_extra_compare_names_it(tiny_gguf):
    code = BLOCK_LLAMA_CPP + textwrap.dedent(f"""
        import jaxllama
        model = jaxllama.load({str(tiny_gguf)!r})
        try:
            jaxllama.compare(model, [1, 2, 3])
        except jaxllama.ReferenceUnavailableError as e:
            print(e)
        from jaxllama.cli import main
        sys.exit(main(["compare", "--model", {str(tiny_gguf)!r}, "--tokens", "1,2,3"]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "pip install 'jaxllama[llamacpp]'" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'jaxllama[llamacpp]'" in lines[0], done.stderr
