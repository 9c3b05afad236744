"""`jaxllama cache`: what the jaxllama cache keeps (kind, model, size, last use), and pruning it.

Pruned are the things jaxllama makes and can make again: kept conversions (`gguf/converted.py`),
compiled kernel libraries and XLA's compiled programs. Downloads (known models, wheels, the
llama.cpp sources) are listed and never pruned: a re-download is costly, and they are removed by
path when no longer wanted.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidInputError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Item:
    kind: str  # conversion, kernels, xla, download
    path: str
    model: str | None
    bytes: int
    last_use: float  # seconds since the epoch
    prunable: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list what the jaxllama cache keeps; prune it")
    p.add_argument("--max-size", metavar="SIZE", help="prune least recently used entries until the prunable "
                   "ones fit in SIZE (e.g. 2G, 500M)")
    p.add_argument("--older-than", metavar="AGE", help="prune entries unused for AGE (e.g. 30d, 12h, 2w)")
    p.add_argument("--all", action="store_true", help="prune every prunable entry (downloads stay)")
    p.add_argument("--json", action="store_true", help="print the listing (and what was pruned) as JSON")


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m is None:
        raise InvalidInputError(f"--older-than: {text!r} is not an age (e.g. 30d, 12h, 2w)")
    return float(m.group(1)) * UNITS[m.group(2)]


def _size(path: Path) -> tuple[int, float]:
    """Bytes under `path` and the latest modification time there."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    total, last = 0, path.stat().st_mtime
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            st = f.stat()
            total, last = total + st.st_size, max(last, st.st_mtime)
    return total, last


def listing() -> list[Item]:
    """Everything under the cache directory, least recently used first."""
    from ..gguf import converted
    from ..gguf.default_model import cache_dir

    root = cache_dir()
    items: list[Item] = []
    for e in converted.entries():
        try:
            source = json.loads((e.path / converted.MANIFEST).read_text()).get("source")
        except (OSError, ValueError):
            source = None
        items.append(Item("conversion", str(e.path), source, e.bytes, e.last_use, True))
    for lib in sorted((root / "kernels").glob("*.so")):
        st = lib.stat()
        items.append(Item("kernels", str(lib), None, st.st_size, st.st_mtime, True))
    if (root / "xla").is_dir():
        size, last = _size(root / "xla")
        items.append(Item("xla", str(root / "xla"), None, size, last, True))
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name in ("converted", "kernels", "xla") or p.name.startswith("."):
                continue
            size, last = _size(p)
            items.append(Item("download", str(p), p.name if p.suffix == ".gguf" else None, size, last, False))
    return sorted(items, key=lambda i: i.last_use)


def _remove(item: Item) -> bool:
    from ..gguf import converted

    if item.kind == "conversion":
        return converted.remove(Path(item.path))
    path = Path(item.path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return True


def prune(items: list[Item], max_size: int | None, older_than_s: float | None, everything: bool) -> list[Item]:
    """Remove prunable items (`converted.prune_items`: all, or those unused for `older_than_s`,
    then least recently used ones until the rest fit in `max_size`). Returns the removed ones."""
    from ..gguf.converted import prune_items

    return prune_items([i for i in items if i.prunable], _remove, max_size, older_than_s, everything)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_cache(args: argparse.Namespace) -> int:
    from ..gguf.converted import parse_size

    max_size = parse_size(args.max_size, "--max-size") if args.max_size is not None else None
    older = parse_age(args.older_than) if args.older_than is not None else None
    items = listing()
    pruned = prune(items, max_size, older, args.all) if (max_size is not None or older is not None or args.all) else []
    kept = [i for i in items if i not in pruned]
    if args.json:
        print(json.dumps({"items": [asdict(i) for i in kept], "pruned": [asdict(i) for i in pruned]}))
        return 0
    for i in pruned:
        print(f"pruned  {i.kind:<10} {_human(i.bytes):>10}  {i.path}")
    for i in kept:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.last_use))
        print(f"{i.kind:<10} {_human(i.bytes):>10}  {when}  {i.model or ''}  {i.path}")
    print(f"total {_human(sum(i.bytes for i in kept))} in {len(kept)} entries"
          + (f"; pruned {_human(sum(i.bytes for i in pruned))}" if pruned else ""))
    return 0
