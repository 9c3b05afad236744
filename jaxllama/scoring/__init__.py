"""Batch scoring: log-likelihoods (lm-evaluation-harness's interface), perplexity as llama.cpp
computes it, and KL divergence between two runs, all from jitted, bucketed forwards.

    buckets.py        rows to score, packed into length buckets; one compilation per bucket
    kernels.py        the jitted programs: target log-probs gathered on device, head in blocks
    loglikelihood.py  loglikelihood, loglikelihood_rolling, token_logprobs
    perplexity.py     llama-perplexity's method: chunks, BOS rule, second half scored, ppl ± err
    kld.py            KL divergence and llama.cpp's --kl-divergence statistics; saved base log-probs
    llamacpp.py       the same chunks scored by llama.cpp (the reference; optional extra)
"""

from .buckets import RunStats
from .kernels import compilations
from .kld import KLDivergence, LlamaCppBase, ModelBase, SavedBase, kl_divergence
from .llamacpp import llamacpp_perplexity
from .loglikelihood import TokenLogprobs, loglikelihood, loglikelihood_rolling, token_logprobs
from .perplexity import Perplexity, perplexity

__all__ = ["KLDivergence", "LlamaCppBase", "ModelBase", "Perplexity", "RunStats", "SavedBase", "TokenLogprobs",
           "compilations", "kl_divergence", "llamacpp_perplexity", "loglikelihood", "loglikelihood_rolling",
           "perplexity", "token_logprobs"]
