"""Analyses on top of the forward: the logit lens, attention patterns and head scores,
activation patching sweeps, gradients and attribution patching. Each is a jitted JAX function
with a Python API here and a CLI command (`jaxllama lens`, `attention`, `patch`)."""

from .attention import HeadScores, attention_patterns, attention_weights, head_scores
from .gradients import Gradients, attribution_sweep, log_prob, logit_diff, prob, probe_gradients, rank_correlation
from .lens import Lens, lens_bound, lens_chunk, lens_stats, logit_lens
from .patching import Sweep, patch_sweep, patched_metric

__all__ = ["Gradients", "HeadScores", "Lens", "Sweep", "attention_patterns", "attention_weights", "attribution_sweep",
           "head_scores", "lens_bound", "lens_chunk", "lens_stats", "log_prob", "logit_diff", "logit_lens",
           "patch_sweep", "patched_metric", "prob", "probe_gradients", "rank_correlation"]
