"""The runner's own decoding equals transformers' greedy generate, question after question."""

import torch
from omegaconf import OmegaConf

from sa_bench.attention import SparseMethod
from sa_bench.models.forward import cache_keyword
from sa_bench.models.loading import ModelConfig, load_model
from sa_bench.runner import _answer, _prefill, _rewind
from tests.conftest import ROOT


def test_prefill_once_then_each_question_matches_generate(install):
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"), [])
    sparse = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/dense.yaml"))
    method = SparseMethod.from_config(sparse)
    install(method, model)
    context = tok("x the pass key is #31415. and more words here and there " * 8).input_ids
    questions = [tok(q, add_special_tokens=False).input_ids
                 for q in [" The pass key is #", " so then", " The pass key is #3"]]
    cache, ctx_len, _ = _prefill(model, method, tuple(context), torch.device("cpu"))
    for q in questions:
        ours = _answer(model, method, cache, q, 8, set(), torch.device("cpu"))
        _rewind(cache, ctx_len)
        assert cache.get_seq_length() == ctx_len
        full = torch.tensor([context + q])
        ref = model.generate(full, attention_mask=torch.ones_like(full), do_sample=False,
                             max_new_tokens=8, min_new_tokens=8)
        assert ours == ref[0, full.shape[1]:].tolist()


def test_cache_keyword_follows_the_forward_signature():
    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass

    class New:
        def forward(self, input_ids, cache=None, use_cache=None):
            pass

    assert cache_keyword(Old) == "past_key_values" and cache_keyword(New) == "cache"


def test_resumed_predictions_are_reused_only_for_the_same_sample():
    """Same id, other data (a re-downloaded hub file, a changed generator): the earlier
    prediction is not scored against the new sample; records without a digest are kept."""
    from sa_bench.benchmarks.base import Sample
    from sa_bench.models.prompting import Request
    from sa_bench.runner import input_digest, reusable

    def request(sid, context, answers):
        return Request(Sample(sid, "c", "q", answers), context, [7, 8], False)

    a, b = request("a", [1, 2, 3], ["x"]), request("b", [4, 5], ["y"])
    digests = {r.sample.id: input_digest(r) for r in (a, b)}
    assert digests["a"] != input_digest(request("a", [1, 2, 4], ["x"]))  # other context
    assert digests["a"] != input_digest(request("a", [1, 2, 3], ["z"]))  # other answers
    assert digests["a"] == input_digest(request("a", (1, 2, 3), ["x"]))
    earlier = {"a": {"id": "a", "input": digests["a"]}, "b": {"id": "b", "input": "stale"},
               "old": {"id": "old"}}
    assert set(reusable(earlier, digests)) == {"a"}
    assert set(reusable({"a": {"id": "a"}}, digests)) == set()  # no recorded input: redone
