"""Compare jaxllama with llama.cpp probe by probe, and find where the two first part.

Both run the same tokens; ours records statistics on device and captures every probe, llama.cpp's
tensors come from its eval callback (`capture.capture`). For each probe and layer the
report gives the statistics on both sides and, on the tensors themselves, the max abs
difference, the relative error `|a - b| / |b|` (Frobenius norms) and the cosine similarity.
The first probe, in execution order, whose relative error exceeds `tol` is where they part.
A probe llama.cpp did not deliver (missing, or of a type we cannot read) is listed as missing
and makes the comparison fail: agreement is only reported for what was checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..loader import Model
from .binding import INSTALL_HINT, ReferenceUnavailableError, is_installed
from .capture import capture
from ..tracing.probes import STAT_NAMES, Intervention, statistics_numpy
from ..tracing.recorder import finite_or_none, trace

#: llama.cpp's names where they differ from ours
LLAMACPP_NAMES = {"inp_embd": ("inp_embd", "embd")}
MOMENTS = ("rms", "mean", "std", "min", "max", "absmax")


@dataclass
class ProbeDiff:
    """One probe at one layer (None for global probes), ours against llama.cpp's."""

    probe: str
    layer: int | None
    ours: dict[str, float]
    theirs: dict[str, float]
    max_abs: float
    rel_err: float
    cosine: float
    stat_rel_err: float  # largest |ours - theirs| / max(|theirs|, theirs rms) over the moments

    def as_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "layer": self.layer,
            "max_abs": finite_or_none(self.max_abs),
            "rel_err": finite_or_none(self.rel_err),
            "cosine": finite_or_none(self.cosine),
            "stat_rel_err": finite_or_none(self.stat_rel_err),
            "ours": {k: finite_or_none(v) for k, v in self.ours.items()},
            "llama_cpp": {k: finite_or_none(v) for k, v in self.theirs.items()},
        }


@dataclass
class Comparison:
    diffs: list[ProbeDiff]
    tol: float
    tokens: list[int]
    act_quant: bool
    #: llama.cpp tensors not delivered, with the reason ("not produced" or the unreadable type)
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every probe was compared and none exceeds `tol`."""
        return not self.missing and self.first_divergence is None

    @property
    def first_divergence(self) -> ProbeDiff | None:
        """The first probe in execution order whose relative error exceeds `tol`."""
        return next((d for d in self.diffs if not d.rel_err <= self.tol), None)

    def table(self, only_layers: Sequence[int] | None = None) -> str:
        lines = [f"{'layer':>5}  {'probe':<13} {'rms ours':>10} {'rms cpp':>10} {'max|d|':>10} "
                 f"{'rel err':>9} {'cosine':>9}  note"]
        first = self.first_divergence
        for d in self.diffs:
            if only_layers is not None and d.layer is not None and d.layer not in only_layers:
                continue
            note = "<- first divergence" if d is first else ("" if d.rel_err <= self.tol else "diverged")
            layer = "" if d.layer is None else d.layer
            lines.append(f"{layer:>5}  {d.probe:<13} {d.ours['rms']:>10.4g} {d.theirs['rms']:>10.4g} "
                         f"{d.max_abs:>10.3g} {d.rel_err:>9.2e} {d.cosine:>9.6f}  {note}".rstrip())
        return "\n".join(lines)

    def summary(self) -> str:
        first = self.first_divergence
        lines = []
        if not self.diffs:
            lines.append("no probe could be compared")
        elif first is None:
            lines.append(f"all {len(self.diffs)} compared probes agree within relative error {self.tol:g}")
        else:
            where = "outside the layers" if first.layer is None else f"layer {first.layer}"
            lines.append(f"first divergence: {first.probe} at {where} (relative error {first.rel_err:.3g} > "
                         f"{self.tol:g}, cosine {first.cosine:.6f})")
        if self.missing:
            shown = ", ".join(f"{k} ({v})" for k, v in list(self.missing.items())[:8])
            more = f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else ""
            lines.append(f"NOT CHECKED: {len(self.missing)} probes missing from llama.cpp's capture: {shown}{more}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "tol": self.tol,
            "act_quant_emulated": self.act_quant,
            "ok": self.ok,
            "first_divergence": None if first is None else {"probe": first.probe, "layer": first.layer},
            "missing_in_llama_cpp": self.missing,
            "probes": [d.as_dict() for d in self.diffs],
        }


def _diff(probe: str, layer: int | None, ours_stats: dict[str, float], a: np.ndarray, b: np.ndarray) -> ProbeDiff:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    theirs = statistics_numpy(b)
    delta = a - b
    nb, na = np.linalg.norm(b), np.linalg.norm(a)
    rel = float(np.linalg.norm(delta) / nb) if nb > 0 else float(np.linalg.norm(delta) > 0)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    scale = max(theirs["rms"], 1e-30)
    stat_rel = max(abs(ours_stats[k] - theirs[k]) / max(abs(theirs[k]), scale) for k in MOMENTS)
    return ProbeDiff(probe, layer, ours_stats, theirs, float(np.abs(delta).max()), rel, cos, stat_rel)


def compare(
    model: Model,
    tokens: Sequence[int],
    reference: str | None = None,
    tol: float = 1e-2,
    act_quant: bool = False,
    interventions: Sequence[Intervention] = (),
    n_threads: int | None = None,
) -> Comparison:
    """Run `tokens` through jaxllama and llama.cpp and compare every probe.

    reference: the GGUF llama.cpp loads (default: the model's own file). act_quant: emulate
    llama.cpp's activation quantization on our side. interventions: applied to our forward
    only (e.g. to check that a planted bug is found).
    """
    ids = model.check_tokens(tokens).tolist()
    if not is_installed():
        raise ReferenceUnavailableError(f"jaxllama compare needs llama-cpp-python; {INSTALL_HINT}")
    m = model.with_act_quant(act_quant)
    c = model.config
    with trace(capture=c.probe_order, interventions=interventions) as rec:
        m.logits(ids)
    ours_stats = {(r["probe"], r["layer"]): {k: r[k] for k in STAT_NAMES} for r in rec.records}

    wanted = {f"{p}-{i}" for p in c.layer_probes for i in range(c.n_layer)}
    wanted |= {n for p in c.global_probes for n in LLAMACPP_NAMES.get(p, (p,))}
    tensors, _, unreadable = capture(reference or model.source, ids, keep=wanted.__contains__, n_threads=n_threads)

    t = len(ids)
    diffs: list[ProbeDiff] = []
    missing: dict[str, str] = {}
    before = [p for p in c.global_probes if not p.startswith("result_")]
    order = [(p, None) for p in before]
    order += [(p, i) for i in range(c.n_layer) for p in c.layer_probes]
    order += [(p, None) for p in c.global_probes if p not in before]
    for probe, layer in order:
        names = [f"{probe}-{layer}"] if layer is not None else list(LLAMACPP_NAMES.get(probe, (probe,)))
        theirs = next((tensors[n] for n in names if n in tensors), None)
        if theirs is None:
            missing[names[0]] = next((unreadable[n] for n in names if n in unreadable), "not produced")
            continue
        ours = rec.activation(probe, layer)[0]
        diffs.append(_diff(probe, layer, ours_stats[(probe, layer)], ours.reshape(t, -1), theirs.reshape(t, -1)))
    return Comparison(diffs, tol, ids, act_quant, missing)
