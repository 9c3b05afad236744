"""Many processes (one host or several) with `jax.distributed`: start-up, the share of work of
each process, and the reduction of per-item results. Process 0 prints.

Configured by `--coordinator HOST:PORT --num-processes N --process-id I` or the environment
variables `JAXLLAMA_COORDINATOR`, `JAXLLAMA_NUM_PROCESSES`, `JAXLLAMA_PROCESS_ID`. Each process
computes on its own local devices (its own mesh); only the results cross processes, through
JAX's collectives (`multihost_utils.process_allgather`; gloo on CPU).

`jax.distributed.initialize` aborts the whole process (no Python exception) when the coordinator
cannot be reached before its timeout, so the coordinator is probed over TCP first: an
unreachable one is a one-line `InvalidInputError` after `timeout` seconds, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from ..errors import InvalidInputError

ENV = {"coordinator": "JAXLLAMA_COORDINATOR", "num_processes": "JAXLLAMA_NUM_PROCESSES",
       "process_id": "JAXLLAMA_PROCESS_ID", "timeout": "JAXLLAMA_DIST_TIMEOUT",
       "collective_timeout": "JAXLLAMA_TIMEOUT"}
DEFAULT_TIMEOUT = 60  # seconds to wait for the coordinator and the other processes to join
DEFAULT_COLLECTIVE_TIMEOUT = 600  # seconds one exchange may wait for the other processes' results
_collective_timeout = float(DEFAULT_COLLECTIVE_TIMEOUT)
_process_id = 0  # this process in the cluster, kept where a watchdog can read it without JAX


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: `coordinator` HOST:PORT, `num_processes`, `process_id`."""

    coordinator: str
    num_processes: int
    process_id: int
    timeout: int = DEFAULT_TIMEOUT
    collective_timeout: int = DEFAULT_COLLECTIVE_TIMEOUT


def _int(value: object, what: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise InvalidInputError(f"{what}: expected an integer, not {value!r}") from None


def cluster_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 timeout: int | None = None, env: Mapping[str, str] | None = None,
                 collective_timeout: int | None = None) -> Cluster | None:
    """The cluster named by the arguments, else by the environment; None for a single process.

    Raises `InvalidInputError` for incomplete or out-of-range settings.
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV["coordinator"])
    num_processes = num_processes if num_processes is not None else env.get(ENV["num_processes"])
    process_id = process_id if process_id is not None else env.get(ENV["process_id"])
    timeout = timeout if timeout is not None else env.get(ENV["timeout"], DEFAULT_TIMEOUT)
    collective = (collective_timeout if collective_timeout is not None
                  else env.get(ENV["collective_timeout"], DEFAULT_COLLECTIVE_TIMEOUT))
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if not any(given):
        return None
    if not all(given):
        raise InvalidInputError("--coordinator, --num-processes and --process-id go together "
                                f"(or {ENV['coordinator']}, {ENV['num_processes']}, {ENV['process_id']})")
    n, i, t = _int(num_processes, "--num-processes"), _int(process_id, "--process-id"), _int(timeout, "timeout")
    host, port = split_address(str(coordinator))
    if n < 1:
        raise InvalidInputError(f"--num-processes must be >= 1, got {n}")
    if not 0 <= i < n:
        raise InvalidInputError(f"--process-id must be in [0, {n}), got {i}")
    if t < 1:
        raise InvalidInputError(f"timeout must be >= 1 second, got {t}")
    c = _int(collective, "--timeout")
    if c < 1:
        raise InvalidInputError(f"--timeout must be >= 1 second, got {c}")
    return Cluster(f"{host}:{port}", n, i, t, c)


def split_address(address: str) -> tuple[str, int]:
    """`"HOST:PORT"` -> (host, port), or `InvalidInputError`."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"--coordinator: expected HOST:PORT, not {address!r}")
    return host, int(port)


def wait_reachable(address: str, timeout: float) -> None:
    """Return once a TCP connection to `address` succeeds; `InvalidInputError` after `timeout` s."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise InvalidInputError(f"coordinator {address} unreachable after {timeout:g} s ({e.strerror or e}); "
                                        "start process 0 first, check the address and the firewall") from None
            time.sleep(0.2)


def initialize(cluster: Cluster | None) -> None:
    """Join the cluster (`jax.distributed.initialize`, gloo collectives on CPU); no-op for None.

    Must run before any JAX computation. Process 0 hosts the coordinator; the others first wait
    for it to accept connections (at most `cluster.timeout` seconds).
    """
    global _collective_timeout, _process_id
    if cluster is None:
        return
    import jax

    _collective_timeout, _process_id = float(cluster.collective_timeout), cluster.process_id
    if cluster.process_id != 0:
        wait_reachable(cluster.coordinator, cluster.timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               initialization_timeout=cluster.timeout)
    with watchdog("starting the devices"):  # every process's CPU client joins the others here
        jax.devices()


def is_main() -> bool:
    """True in process 0 (the one that prints)."""
    import jax

    return jax.process_index() == 0


def share(n: int, index: int | None = None, count: int | None = None) -> range:
    """The items `0..n-1` this process handles: a contiguous, balanced block per process."""
    import jax

    i = jax.process_index() if index is None else index
    k = jax.process_count() if count is None else count
    return range(i * n // k, (i + 1) * n // k)


@contextlib.contextmanager
def watchdog(what: str) -> Iterator[None]:
    """A process that died or stalls would leave the others waiting for ever in a collective step:
    if the block takes longer than the cluster's `--timeout`, this process says so in one line and
    exits (status 1). A thread watches, so the main thread may sit in XLA's C++ meanwhile."""
    done = threading.Event()

    def expire() -> None:  # no JAX here: the main thread may hold its locks while it waits
        if not done.is_set():
            sys.stderr.write(f"jaxllama: error: process {_process_id}: no answer from the other processes "
                             f"within {_collective_timeout:g} s while {what} (one died or stalls); stopping\n")
            sys.stderr.flush()
            os._exit(1)

    timer = threading.Timer(_collective_timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()


def allgather(x: np.ndarray, what: str = "results") -> np.ndarray:
    """Every process's `x` stacked `[processes, ...]` (JAX's collective; gloo on CPU), under the
    `watchdog`."""
    from jax.experimental import multihost_utils

    with watchdog(f"exchanging {what}"):
        return np.asarray(multihost_utils.process_allgather(x))


def _wire(a: np.ndarray) -> np.ndarray:
    """`a` as JAX carries it without 64-bit mode and without arithmetic: booleans as int8,
    8-byte values as pairs of uint32 (a float64 sum stays the float64 it was)."""
    if a.dtype == bool:
        return a.astype(np.int8)
    if a.dtype.itemsize == 8:
        return np.ascontiguousarray(a).view(np.uint32).reshape(*a.shape, 2)
    return a


def _unwire(w: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype.itemsize == 8 and like.dtype != bool:
        return np.ascontiguousarray(w).view(like.dtype).reshape(w.shape[:-1])
    return w.astype(like.dtype)


def gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays `[n, ...]` whose rows `share(n)` this process filled -> every process's rows.

    Rows travel unchanged and keep their dtype (float64 as its bits, booleans as int8): no
    arithmetic, so the result equals a single process's bit for bit. A no-op in one process.
    """
    import jax

    if jax.process_count() == 1:
        return arrays
    k = jax.process_count()
    out = {}
    for name, a in arrays.items():
        everyone = _unwire(allgather(_wire(a), name), a)  # [k, n, ...]
        merged = np.empty_like(a)
        for p in range(k):
            rows = share(a.shape[0], p, k)
            merged[rows.start:rows.stop] = everyone[p, rows.start:rows.stop]
        out[name] = merged
    return out


def check_same_file(sha256: str, what: str = "model file") -> None:
    """Refuse to go on when the processes loaded different files (their SHA-256 differ)."""
    digests = _everyones(sha256, f"{what} digests")
    if len(set(digests)) > 1:
        listing = ", ".join(f"process {p}: {d[:12]}" for p, d in enumerate(digests))
        raise InvalidInputError(f"the processes loaded different {what}s (SHA-256 {listing}); give every process the same file")


def check_same_work(tokens: np.ndarray, settings: Mapping[str, object]) -> None:
    """Refuse to go on when the processes would score different texts or with other settings
    (a digest of the token ids and the settings), naming the processes that differ from 0.
    Every process raises, so all stop."""
    import hashlib
    import json

    h = hashlib.sha256(np.ascontiguousarray(tokens, np.int64).tobytes())
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    digests = _everyones(h.hexdigest(), "work digests")
    odd = [p for p, d in enumerate(digests) if d != digests[0]]
    if odd:
        names = ", ".join(f"process {p}" for p in odd)
        raise InvalidInputError(f"{names} would score other texts or settings than process 0 (token and settings "
                                "digests differ); give every process the same file and flags")


def _everyones(hexdigest: str, what: str) -> list[str]:
    """Every process's hex digest (just this one's in a single process)."""
    import jax

    if jax.process_count() == 1:
        return [hexdigest]
    mine = np.frombuffer(bytes.fromhex(hexdigest), np.uint8).astype(np.int32)
    return [bytes(row.astype(np.uint8)).hex() for row in allgather(mine, what)]

