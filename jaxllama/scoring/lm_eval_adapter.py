"""An lm-evaluation-harness model type, "jaxllama" (the `jaxllama[lm-eval]` extra).

    import jaxllama.scoring.lm_eval_adapter      # registers "jaxllama" with lm-eval
    lm_eval.simple_evaluate(model="jaxllama", model_args="pretrained=model.gguf,batch_size=8", tasks=[...])

`loglikelihood` and `loglikelihood_rolling` go to `jaxllama.scoring` (batched, bucketed, jitted);
`generate_until` generates with `jaxllama.generation` (greedy unless `do_sample`) and cuts the text
at the first stop string. Text is tokenized with llama.cpp's rules (special-token text is not parsed).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry loads them only while empty
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import InvalidInputError
from .loglikelihood import loglikelihood, loglikelihood_rolling


@register_model("jaxllama")
class JaxLlamaLM(LM):
    """lm-eval's `LM` interface on a jaxllama `Model` (a GGUF path, or `model=` an already loaded one)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, act_quant: bool = False,
                 model: Any = None, **_: Any):
        super().__init__()
        if model is None:
            from ..loader import load

            model = load(pretrained, dtype=dtype)
        self.model = model.with_act_quant() if act_quant else model
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else self.model.config.context_length
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.source)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        return loglikelihood(self.model, [tuple(r.args) for r in requests], self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        return loglikelihood_rolling(self.model, [r.args[0] for r in requests], self.batch_size, self.max_length)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from ..generation.loop import generate
        from ..generation.sampling import Sampler

        tok, out = self.model.tokenizer, []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampler = Sampler(temperature=0.0)
            if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) > 0:
                sampler = Sampler(temperature=float(kwargs["temperature"]), top_k=0, top_p=1.0, min_p=0.0)
            ids = tok.encode(context, add_special=True)
            if not ids:
                raise InvalidInputError("generate_until: empty context")
            n = max(1, min(n, self.max_length - 1))
            ids = ids[-(self.max_length - n):]  # keep the end of a long context, as lm-eval's HF model does
            g = generate(self.model, [ids], n, sampler, seed=int(kwargs.get("seed", 0)))
            text = tok.decode([t for t in g.tokens[0] if t not in tok.eog_ids])
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
