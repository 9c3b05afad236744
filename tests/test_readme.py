"""The README's commands and Python example run as written (public imports included)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.llamacpp  # the example calls jaxllama.compare
def test_python_example_runs(default_gguf, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # in order, sharing names, as a reader would paste them
        exec(compile(block, "README.md", "exec"), namespace)


def test_main_job_command_prints_the_layer_table(default_gguf):
    line = next(l for l in README.splitlines() if "the main job" in l)
    args = shlex.split(line.split("#")[0])[1:]  # after ".venv/bin/jaxllama"
    assert args[0] == "trace"
    done = subprocess.run([sys.executable, "-m", "jaxllama", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "probe", "rms"]
    assert sum(1 for l in lines if l.split()[:2] == ["29", "l_out"]) == 1

