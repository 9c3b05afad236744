"""Analyses on top of the forward: the logit lens, attention patterns and head scores,
activation patching sweeps. Each is a jitted JAX function with a Python API here and a CLI
command (`jaxllama lens`, `attention`, `patch`)."""

from .attention import HeadScores, attention_patterns, attention_weights, head_scores
from .lens import Lens, lens_bound, lens_chunk, lens_stats, logit_lens
from .patching import Sweep, patch_sweep, patched_metric

__all__ = ["HeadScores", "Lens", "Sweep", "attention_patterns", "attention_weights", "head_scores", "lens_bound",
           "lens_chunk", "lens_stats", "logit_lens", "patch_sweep", "patched_metric"]
