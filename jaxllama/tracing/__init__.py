"""Looking inside the forward: named probes, on-device statistics through `jax.debug.callback`,
the `trace()` recorder, interventions, and the emulation of llama.cpp's activation quantization.

    probes.py         the probe vocabulary (llama.cpp's tensor names), ProbeSpec, statistics
    recorder.py       `with trace(...) as rec`: records, tables, plots, captured arrays
    interventions.py  ready-made replacements: zero, scale, patch, swap_swiglu
    actquant.py       llama.cpp's Q8 activation round trips, to tell quantization from bugs
"""

from . import interventions
from .probes import GLOBAL_PROBES, LAYER_PROBES, ORDER, Intervention, ProbeSpec
from .recorder import Recorder, trace

__all__ = ["GLOBAL_PROBES", "LAYER_PROBES", "ORDER", "Intervention", "ProbeSpec", "Recorder", "interventions", "trace"]
