"""Recording statistics and activations of forward calls made inside `with trace(...) as rec:`.

    with jaxllama.trace(probes=["attn_norm", "l_out"], layers=range(4)) as rec:
        model.logits(tokens)
    print(rec.table())            # per layer and probe: rms, min, max, mean, NaN/Inf, jumps
    rec.plot()                    # rms across layers, one line per probe
    rec.activation("l_out", 3)    # a captured array (if capture=... was asked)

Statistics are computed on device and arrive through `jax.debug.callback`; `Model.logits`
and `Model.logits_batch` pick up the innermost active recorder, compile a forward with its
static `ProbeSpec`, and wait for every callback (`jax.effects_barrier`) before returning.
"""

from __future__ import annotations

import dataclasses
import html
import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np

from ..gguf.config import LlamaConfig
from .probes import (
    ALL_PROBES,
    GLOBAL_PROBES,
    LAYER_PROBES,
    ORDER,
    RECEIVERS,
    STAT_NAMES,
    Intervention,
    ProbeSpec,
    check_layers,
    check_probe_names,
    validate,
)

JUMP = 4.0  # an rms changing by more than this factor from one layer to the next is flagged

def active_recorder() -> "Recorder | None":
    """The innermost recorder of an enclosing `with trace(...)`, if any (see `probes.RECEIVERS`)."""
    return RECEIVERS.innermost()


class Recorder:
    """Collects statistics records (and captured activations) of traced forward calls.

    Each record is a dict: `call` (index of the forward call), `layer` (None for global
    probes), `probe`, `row` (batch row), `position` (with per_position, and for every record of
    a decode step, which describes one token), `step` (in a generation: 0 for the prompt, k for
    the k-th decode step) and the statistics `rms mean std min max absmax nan inf`.
    """

    def __init__(
        self,
        probes: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        per_position: bool = False,
        capture: Iterable[str] = (),
        capture_layers: Iterable[int] | None = None,
        interventions: Sequence[Intervention] = (),
    ):
        self.probes = None if probes is None else check_probe_names(probes)  # None: all the model has
        self.layers = None if layers is None else tuple(layers)
        self.capture_layers = None if capture_layers is None else tuple(capture_layers)
        self.spec = ProbeSpec(
            stats=self.probes or (),
            per_position=per_position,
            capture=check_probe_names(capture, "capture probe"),
            capture_layers=self.capture_layers,
            interventions=tuple(interventions),
        )
        self.records: list[dict[str, Any]] = []
        self.captured: list[dict[str, np.ndarray]] = []  # per call
        self._call = -1
        self._prompt_lengths: np.ndarray | None = None  # per row, while a generation is recorded
        self._rows: int | None = None  # the caller's rows in the running call (None: all)
        self._kept_layers: tuple[int, ...] = ()
        self._order: tuple[str, ...] = ORDER

    # --- used by Model -------------------------------------------------------------------
    def spec_for(self, c: LlamaConfig) -> ProbeSpec:
        """The static probe selection for model `c`, checked against it (raises on bad names/layers)."""
        check_layers(self.layers, c)
        if self.probes is None:  # every probe this architecture has
            self.spec = dataclasses.replace(self.spec, stats=c.probe_order)
        validate(self.spec, c)
        self._order = c.probe_order
        self._kept_layers = tuple(range(c.n_layer)) if self.capture_layers is None else tuple(sorted(set(self.capture_layers)))
        return self.spec

    def begin_call(self, prompt_lengths: Sequence[int] | None = None, rows: int | None = None) -> None:
        """A forward call starts; for a generation, `prompt_lengths` per row (records get a `step`).

        Only the first `rows` rows (default: one per prompt length, else all) are recorded: rows a
        mesh's data axis added as padding are not the caller's."""
        self._call += 1
        self._prompt_lengths = None if prompt_lengths is None else np.asarray(prompt_lengths)
        self._rows = len(prompt_lengths) if rows is None and prompt_lengths is not None else rows

    def end_call(self, captures: dict[str, Any] | None = None) -> None:
        jax.effects_barrier()
        self.captured.append({k: np.asarray(v) for k, v in (captures or {}).items()})
        self._prompt_lengths = None

    def __call__(self, layer: int, stats: dict[str, np.ndarray], positions: np.ndarray, valid: np.ndarray) -> None:
        """Receive one callback's statistics (runs on the host, in a JAX runtime thread)."""
        lay = None if layer < 0 else layer
        if lay is not None and self.layers is not None and lay not in self.layers:
            return
        one_token = positions.shape[1] == 1  # a decode step: every record is one token's
        for probe, values in stats.items():
            for row in range(values.shape[0] if self._rows is None else min(self._rows, values.shape[0])):
                if self.spec.per_position:
                    for t in range(values.shape[1]):
                        if valid[row, t]:
                            self._add(lay, probe, row, int(positions[row, t]), values[row, t])
                elif valid[row].any():
                    self._add(lay, probe, row, int(positions[row, 0]) if one_token else None, values[row])

    def _add(self, layer: int | None, probe: str, row: int, pos: int | None, v: np.ndarray) -> None:
        rec: dict[str, Any] = {"call": self._call, "layer": layer, "probe": probe, "row": row}
        if pos is not None:
            rec["position"] = pos
        if self._prompt_lengths is not None:  # 0: the prompt; k: the k-th decode step
            rec["step"] = 0 if pos is None or pos < self._prompt_lengths[row] else int(pos - self._prompt_lengths[row] + 1)
        rec.update({k: float(x) for k, x in zip(STAT_NAMES, v)})
        self.records.append(rec)

    # --- reading -----------------------------------------------------------------------------
    def sorted_records(self) -> list[dict[str, Any]]:
        """Records in execution order: call, row, layer (global probes first/last), probe."""

        def key(r: dict[str, Any]) -> tuple:
            probe_rank = self._order.index(r["probe"]) if r["probe"] in self._order else len(ALL_PROBES)
            layer = r["layer"]
            before_layers = r["probe"] in GLOBAL_PROBES and not r["probe"].startswith("result_")
            stage = -1 if before_layers else (10**9 if layer is None else layer)
            return (r["call"], r["row"], r.get("position", -1), stage, probe_rank)

        return sorted(self.records, key=key)

    def activation(self, probe: str, layer: int | None = None, call: int = -1) -> np.ndarray:
        """A captured activation: `[B, T, ...]` of `probe` at `layer` (None for global probes)."""
        if not self.captured:
            raise KeyError("nothing captured: pass capture=[...] to trace() and run a forward inside it")
        caps = self.captured[call]
        if probe not in caps:
            raise KeyError(f"probe {probe!r} was not captured; captured: {', '.join(caps)}")
        if probe in GLOBAL_PROBES:
            return caps[probe]
        if layer not in self._kept_layers:
            raise KeyError(f"layer {layer} was not captured; captured layers: {list(self._kept_layers)}")
        return caps[probe][self._kept_layers.index(layer)]

    def nonfinite(self) -> list[dict[str, Any]]:
        """Records with NaN or Inf values, in execution order (the first one is where it began)."""
        return [r for r in self.sorted_records() if r["nan"] or r["inf"]]

    def jumps(self) -> list[tuple[dict[str, Any], float]]:
        """(record, factor) where a probe's rms changed by more than `JUMP`x from the layer before."""
        out, last = [], {}
        for r in self.sorted_records():
            if r["layer"] is None:
                continue
            key = (r["call"], r["row"], r.get("position"), r["probe"])
            prev_layer, prev = last.get(key, (None, 0.0))
            if prev_layer == r["layer"] - 1 and prev > 0 and r["rms"] > 0:
                factor = r["rms"] / prev
                if factor > JUMP or factor < 1 / JUMP:
                    out.append((r, factor))
            last[key] = (r["layer"], r["rms"])
        return out

    def table(self, call: int | None = None, row: int = 0, max_rows: int | None = None) -> str:
        """A text table: one line per layer and probe, with NaN/Inf and rms jumps flagged."""
        call = self._call if call is None else call
        flags = {id(r): f"rms x{f:.3g} vs previous layer" for r, f in self.jumps()}
        lines = [f"{'layer':>5}  {'probe':<13} {'rms':>10} {'min':>11} {'max':>11} {'mean':>11}  note"]
        rows = [r for r in self.sorted_records() if r["call"] == call and r["row"] == row and "position" not in r]
        for r in rows[:max_rows]:
            note = []
            if r["nan"] or r["inf"]:
                note.append(f"!! {int(r['nan'])} NaN, {int(r['inf'])} Inf")
            if id(r) in flags:
                note.append(flags[id(r)])
            layer = "" if r["layer"] is None else r["layer"]
            lines.append(
                f"{layer:>5}  {r['probe']:<13} {r['rms']:>10.4g} {r['min']:>11.4g} {r['max']:>11.4g} "
                f"{r['mean']:>11.4g}  {'; '.join(note)}".rstrip()
            )
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more")
        return "\n".join(lines)

    def plot(self, path: str | None = None, probes: Iterable[str] | None = None, call: int | None = None):
        """rms per layer, one line per probe (log scale); saved to `path` if given. Returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        call = self._call if call is None else call
        chosen = [p for p in (probes or self.spec.stats) if p in LAYER_PROBES]
        fig, ax = plt.subplots(figsize=(9, 5))
        for probe in chosen:
            pts = sorted(
                (r["layer"], r["rms"]) for r in self.records
                if r["probe"] == probe and r["call"] == call and r["row"] == 0 and "position" not in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=probe)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("rms")
        ax.set_title("rms of each probe across layers")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
            plt.close(fig)
        return fig

    def __repr__(self) -> str:
        bad = self.nonfinite()
        where = f"first NaN/Inf at {bad[0]['probe']} layer {bad[0]['layer']}" if bad else "no NaN/Inf"
        return f"<Recorder: {self._call + 1} call(s), {len(self.records)} records, {len(self.spec.stats)} probes, {where}>"

    def _repr_html_(self) -> str:
        body = html.escape(self.table(max_rows=60))
        return f"<p>{html.escape(repr(self))}</p><pre>{body}</pre>"


@contextmanager
def trace(
    probes: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    per_position: bool = False,
    capture: Iterable[str] = (),
    capture_layers: Iterable[int] | None = None,
    interventions: Sequence[Intervention] = (),
) -> Iterator[Recorder]:
    """Record statistics (and `capture`d activations) of every `Model` forward call inside.

    probes: probe names to record (None: every probe the model has); layers: layers to keep
    records for (None: all); per_position: one record per token position;
    capture/capture_layers: activations to keep as arrays; interventions: replacements
    applied to the forward (see `interventions`). Unknown names or layers raise
    `InvalidInputError` listing the valid ones.
    """
    rec = Recorder(probes, layers, per_position, capture, capture_layers, interventions)
    RECEIVERS.push(rec)
    try:
        yield rec
    finally:
        jax.effects_barrier()
        RECEIVERS.remove(rec)


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/Inf: write them as null."""
    return x if math.isfinite(x) else None
