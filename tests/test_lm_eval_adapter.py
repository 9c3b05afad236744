"""The lm-evaluation-harness adapter, called through lm-eval's own request objects and registry."""

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

import jaxllama
from jaxllama.scoring import loglikelihood, loglikelihood_rolling
from jaxllama.scoring.lm_eval_adapter import JaxLlamaLM
from tiny_models import TinySpec


def next_argmax(model, ids, width=32):
    tokens, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    tokens[0, : len(ids)], valid[0, : len(ids)] = ids, True
    return int(np.asarray(jaxllama.forward_jit(model.params, tokens, model.config, valid))[0, len(ids) - 1].argmax())


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def tiny_lm(tiny_factory):
    path = tiny_factory(TinySpec(context=256))
    lm = get_model("jaxllama").create_from_arg_string(f"pretrained={path},batch_size=4,max_gen_toks=12")
    return path, lm


def test_registered_without_hiding_lm_evals_own_models(tiny_lm):
    assert get_model("jaxllama") is JaxLlamaLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's registry still finds its models
    _, lm = tiny_lm
    assert lm.batch_size == 4 and lm.max_gen_toks == 12 and isinstance(lm.model, jaxllama.Model)


def test_loglikelihood_and_rolling_through_lm_eval_instances(tiny_lm):
    _, lm = tiny_lm
    pairs = [("abcdef", "ghi"), ("hello ", "world"), ("", "xyz!")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    want = loglikelihood(lm.model, pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert np.allclose([x for x, _ in got], [x for x, _ in want], rtol=1e-6)
    assert all(isinstance(x, float) and x < 0 and isinstance(g, bool) for x, g in got)
    texts = ["the quick brown fox " * 20, "short"]
    rolled = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    assert np.allclose(rolled, loglikelihood_rolling(lm.model, texts), rtol=1e-6)


def test_generate_until_is_greedy_and_stops_at_the_first_stop_string(tiny_lm):
    _, lm = tiny_lm
    tok = lm.model.tokenizer
    free = lm.generate_until([_req("generate_until", ("abc", {"until": [], "max_gen_toks": 12}))])[0]
    ids = tok.encode("abc")
    greedy = []
    for _ in range(12):  # the plain forward, right-padded to one width (one compilation)
        greedy.append(next_argmax(lm.model, ids + greedy))
    assert free == tok.decode([t for t in greedy if t not in tok.eog_ids])
    stop = free[5:7]
    cut = lm.generate_until([_req("generate_until", ("abc", {"until": [stop, "~never~"], "max_gen_toks": 12}))])[0]
    assert cut == free[: free.index(stop)]
