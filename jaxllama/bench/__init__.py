"""`jaxllama bench`: jaxllama next to llama.cpp on one GGUF, as JSON (`sections`: the sections and the command;
`common`: timing, machine, memory, child processes; `device`: an accelerator's figures; `scoring`:
perplexity next to llama-perplexity)."""

from .common import child_json, kernel_table, machine, peak_rss_mb, reset_peak_rss, run_child, timed
from .sections import (DEFAULT_SECTIONS, MAX_DECODE_TOKENS, SECTIONS, add_arguments, check_arguments, main,
                  parse_sections, run)

__all__ = ["DEFAULT_SECTIONS", "MAX_DECODE_TOKENS", "SECTIONS", "add_arguments", "check_arguments", "child_json",
           "kernel_table", "machine", "main", "parse_sections", "peak_rss_mb", "reset_peak_rss", "run", "run_child",
           "timed"]
