"""Converted parameters kept on disk, so that loading the same GGUF again skips the conversion.

Converting the default model's tensors into the native layout is one compiled program, and
tracing, lowering and loading that program takes 0.4 s of a 0.65 s load, every process (the
compilation cache spares the compiling only). `jaxllama.load` therefore writes what it converted
once, as plain `.npy` arrays (read back with `allow_pickle=False`: data, never code) and a JSON
manifest, in `<cache>/converted/<key>/`, and reads it back next time.

Trust: the key covers the GGUF's identity as `fstat` gives it for the very descriptor that was
mapped and read (path, size, inode, device, mtime and ctime: a write changes ctime and `utime`
cannot set it back), the layout, jax's version and the source of this package's conversion code
(`jaxllama/gguf/*.py`), so a changed file or converter never finds a stale entry. Every array
carries an xxh3 checksum checked on read: a flipped byte or a truncated array is reported in one
line on stderr and the entry converted anew. Entries are written to a temporary directory,
fsynced and renamed into place, under a per-entry `fcntl` lock so that processes converting the
same file at once wait for one another instead of undoing each other's work; temporary
directories left by killed processes are removed.

Only the native layout is kept (the compact one: the default model's entry is 92 MiB), and only
for files with at least `MIN_BYTES` of tensor data (tiny test models are converted every time).
The whole cache is held under `max_bytes()` (10 GiB, `JAXLLAMA_CACHE_MAX`), least recently used
entries removed first after each write; `jaxllama cache` lists and prunes it.
`JAXLLAMA_CONVERTED_CACHE=0` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import xxhash

from ..errors import InvalidInputError
from .convert import Params, flatten_paths, unflatten_paths

MIN_BYTES = 16 * 2**20  # tensor bytes from which a file's conversion is kept
LAYOUTS = ("native",)  # layouts kept
FORMAT = 2
MANIFEST = "manifest.json"
DEFAULT_MAX_BYTES = 10 * 2**30
PARTIAL = ".partial-"


def enabled() -> bool:
    return os.environ.get("JAXLLAMA_CONVERTED_CACHE", "1") != "0"


def parse_size(text: str, what: str) -> int:
    """Bytes from `10G`, `512M`, `2GiB`, `1e9`; a one-line error otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    try:
        value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ") if m else -1.0
    except ValueError:
        value = -1.0
    if not 0 <= value < 2**63:
        raise InvalidInputError(f"{what}: {text!r} is not a size (e.g. 10G, 512M)")
    return int(value)


def max_bytes() -> int:
    """The converted cache's size limit: `JAXLLAMA_CACHE_MAX` (e.g. `20G`) or 10 GiB."""
    text = os.environ.get("JAXLLAMA_CACHE_MAX")
    return DEFAULT_MAX_BYTES if text is None else parse_size(text, "JAXLLAMA_CACHE_MAX")


def root() -> Path:
    from .default_model import cache_dir

    return cache_dir() / "converted"


def _code_hash() -> str:
    h = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()


def entry_dir(path: Path, layout: str, tensor_bytes: int, st: os.stat_result | None) -> Path | None:
    """Where the conversion of `path` in `layout` is kept, or None if it is not kept. `st` is the
    `fstat` of the descriptor the GGUF was read through (`GGUFFile.stat`)."""
    if not enabled() or layout not in LAYOUTS or tensor_bytes < MIN_BYTES or st is None:
        return None
    try:
        where = str(path.resolve())
    except OSError:
        return None
    ident = {"format": FORMAT, "path": where, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev, "layout": layout,
             "jax": jax.__version__, "code": _code_hash()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return root() / key


@contextlib.contextmanager
def locked(entry: Path | None, wait: bool = True) -> Iterator[bool]:
    """Hold `entry`'s lock (an `fcntl` lock on `<entry>.lock`): one process converts and writes
    a file's entry while the others wait, then read it. Yields whether the lock is held: False
    when `wait=False` and another process holds it, or when the cache directory cannot be
    written (nothing to protect then)."""
    if entry is None:
        yield False
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{entry}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _checksum(arr: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


class _Damaged(Exception):
    """A kept entry that does not read back exactly as written."""


def load(entry: Path | None) -> Params | None:
    """The parameters kept in `entry` (on the default device), or None if there are none. An entry
    that does not read back exactly as written (manifest, file names, dtypes, shapes, checksums)
    is reported in one line on stderr and None is returned: the caller converts anew."""
    if entry is None or not (entry / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise _Damaged("an older format")
        flat = {}
        for item in manifest["arrays"]:
            if item["file"] is None:
                flat[item["key"]] = None
                continue
            if not re.fullmatch(r"\d+\.npy", item["file"]):  # only the entry's own files are read
                raise _Damaged(f"a foreign file name {item['file']!r}")
            arr = np.load(entry / item["file"], allow_pickle=False)
            if arr.dtype.str != item["dtype"] or list(arr.shape) != item["shape"]:
                raise _Damaged(f"{item['file']} is not the {item['dtype']} {item['shape']} array written")
            if _checksum(arr) != item["xxh3"]:
                raise _Damaged(f"{item['file']} fails its checksum")
            flat[item["key"]] = jax.block_until_ready(jax.device_put(arr))  # copied: `arr` can go now
            del arr  # one array read at a time: the peak is the parameters plus their largest array
        with contextlib.suppress(OSError):  # a read-only cache is still read
            os.utime(entry / MANIFEST)  # last use, for least-recently-used pruning
        return unflatten_paths(flat)
    except (OSError, ValueError, KeyError, TypeError, EOFError, _Damaged) as e:
        why = str(e) if isinstance(e, _Damaged) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"jaxllama: kept conversion {entry} is damaged ({why}); converting again", file=sys.stderr)
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store(entry: Path | None, params: Params, source: Path | None = None) -> None:
    """Keep `params` in `entry` (best effort: a read-only or full disk only skips it), replacing a
    damaged one. Call it holding `locked(entry)`. Written to a temporary directory, fsynced and
    renamed, so a reader never sees a partial entry; then the cache is pruned to `max_bytes()`."""
    if entry is None:
        return
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{os.getpid()}-", dir=entry.parent))
        arrays = []
        for i, (key, value) in enumerate(flatten_paths(params["params"]).items()):
            if value is None:
                arrays.append({"key": key, "file": None})
                continue
            arr = np.asarray(jax.device_get(value))
            with open(tmp / f"{i}.npy", "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            arrays.append({"key": key, "file": f"{i}.npy", "dtype": arr.dtype.str, "shape": list(arr.shape),
                           "xxh3": _checksum(arr)})
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(json.dumps({"format": FORMAT, "source": str(source) if source else None, "arrays": arrays}))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry (`load` could not read it) is replaced
        os.replace(tmp, entry)
        tmp = None
        _fsync(entry.parent)
        prune(max_bytes(), keep=entry)
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(where: Path) -> None:
    """Remove temporary directories whose writing process is gone (killed mid-write)."""
    for d in where.glob(f"{PARTIAL}*"):
        m = re.match(rf"{re.escape(PARTIAL)}(\d+)-", d.name)
        if m is None or not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class Entry:
    """One kept conversion: its directory, size on disk and last use (seconds since the epoch)."""

    path: Path
    bytes: int
    last_use: float
    arrays: int


def entries() -> list[Entry]:
    """The kept conversions, least recently used first."""
    out = []
    base = root()
    if not base.is_dir():
        return out
    for d in base.iterdir():
        if not d.is_dir() or d.name.startswith(PARTIAL):
            continue
        files = [f for f in d.iterdir() if f.is_file()]
        try:
            last = (d / MANIFEST).stat().st_mtime
        except OSError:
            last = d.stat().st_mtime
        out.append(Entry(d, sum(f.stat().st_size for f in files), last, len(files) - 1))
    return sorted(out, key=lambda e: e.last_use)


def remove(entry: Path) -> bool:
    """Remove one kept conversion under its lock, unless another process holds that lock now
    (it is converting or writing that entry: never waited for, so two pruning writers cannot
    wait on each other). Returns whether it was removed."""
    with locked(entry, wait=False) as held:
        if held:
            shutil.rmtree(entry, ignore_errors=True)
        return held


def prune_items(items: list[Any], remove: Callable[[Any], bool], limit: int | None = None,
                older_than_s: float | None = None, everything: bool = False, keep: Any = None) -> list[Any]:
    """Of `items` (least recently used first, each with `path`, `bytes` and `last_use`) remove
    all (`everything`), or those unused for `older_than_s`, then the least recently used until
    the rest fit in `limit` bytes; `keep` (a path) stays. `remove(item)` says whether it could
    remove it (one it could not still counts against `limit`). Returns the removed items."""
    removed = []
    now = time.time()
    for e in items:
        if (everything or (older_than_s is not None and now - e.last_use > older_than_s)) and e.path != keep \
                and remove(e):
            removed.append(e)
    live = [e for e in items if e not in removed]
    if limit is not None:
        total = sum(e.bytes for e in live)
        for e in live:
            if total <= limit:
                break
            if e.path != keep and remove(e):
                removed.append(e)
                total -= e.bytes
    return removed


def prune(limit: int | None = None, older_than_s: float | None = None, keep: Path | None = None) -> list[Entry]:
    """Remove kept conversions unused for `older_than_s`, then least recently used ones until the
    rest fit in `limit` bytes (`keep` stays); returns what was removed."""
    return prune_items(entries(), lambda e: remove(e.path), limit, older_than_s, keep=keep)
