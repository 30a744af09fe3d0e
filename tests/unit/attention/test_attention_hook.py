"""The AttentionInterface hook on tiny random Llama / Qwen2 / Mistral models (GQA)."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sa_bench.attention import SparseMethod  # noqa: E402
from sa_bench.attention.maskers import Local, Sink  # noqa: E402
from sa_bench.config import ConfigError  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=300)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
CONF = str(ROOT / "conf" / "sparse")


def make(arch="llama", seed=0):
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**SMALL)).eval()
    ref = model_cls(cfg_cls(**SMALL)).eval()
    ref.load_state_dict(model.state_dict())
    ref.set_attn_implementation("eager")
    return model, ref


_SMALL_FILES: list[str] = []


def small_model_files() -> str:
    """A directory standing for SMALL's checkpoint, holding the files that hashattn and
    double_sparsity look up next to the model (`${model.pretrained}`), random for its shapes."""
    if not _SMALL_FILES:
        import atexit
        import shutil
        import tempfile
        from pathlib import Path

        from sa_bench.perf.attention import model_files

        folder = Path(tempfile.mkdtemp(prefix="sa_bench_small_"))
        atexit.register(shutil.rmtree, folder, True)
        _SMALL_FILES.append(str(model_files(folder, 4, 2, 16, layers=2)))
    return _SMALL_FILES[0]


def load(name, **override):
    with open(os.path.join(CONF, f"{name}.yaml")) as f:
        data = yaml.safe_load(f.read().replace("${model.pretrained}", small_model_files()))
    data.update(override)
    return data


def ids(n, seed=1):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def run_protocol(model, method, tokens, ctx_len, q_len, steps, chunk=None):
    """Prefill (in chunks of `chunk` tokens), question, token-by-token decode (fixed tokens);
    returns the logits of every position after the context, and the cache."""
    cache = DynamicCache(config=model.config)
    outs = []
    step = chunk or ctx_len
    with torch.no_grad():
        if method:
            method.set_phase("prefill")
        for start in range(0, ctx_len, step):
            last = model(tokens[:, start:min(ctx_len, start + step)], past_key_values=cache).logits
        outs.append(last[:, -1:])
        if method:
            method.set_phase("question")
        outs.append(model(tokens[:, ctx_len:ctx_len + q_len], past_key_values=cache).logits)
        if method:
            method.set_phase("decode")
        for i in range(steps):
            pos = ctx_len + q_len + i
            outs.append(model(tokens[:, pos:pos + 1], past_key_values=cache).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dense_method_equals_eager_math(arch, install):
    """`sparse=dense` runs on SDPA: equal to eager math within float32 tolerance in prefill
    (one pass and chunked), question and decode; with attn_implementation=eager, exactly."""
    model, ref = make(arch)
    tokens = ids(120)
    want, _ = run_protocol(ref, None, tokens, 80, 20, 5)
    method = SparseMethod.from_config(load("dense"))
    install(method, model)
    assert model.config._attn_implementation == method.name
    for chunk in (None, 32, 7):
        got, _ = run_protocol(model, method, tokens, 80, 20, 5, chunk=chunk)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert method.stats()["density"]["decode"] == [1.0, 1.0]
    exact_model, _ = make(arch)
    exact = SparseMethod.from_config(load("dense"))
    install(exact, exact_model, "eager")
    got, _ = run_protocol(exact_model, exact, tokens, 80, 20, 5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chunked_prefill_equals_one_pass(arch, install):
    """The runner's chunked prefill gives the same cache and the same greedy answer as one pass."""
    from sa_bench.runner import _answer, _prefill

    model, _ = make(arch)
    method = SparseMethod.from_config(load("dense"))
    install(method, model)
    context = tuple(ids(203)[0].tolist())
    question = ids(9, seed=2)[0].tolist()
    one, n, _ = _prefill(model, method, context, torch.device("cpu"), None)
    answers = {}
    for chunk in (None, 64, 50):
        cache, n, _ = _prefill(model, method, context, torch.device("cpu"), chunk)
        assert n == 203 and cache.get_seq_length() == 203
        for layer in range(2):
            torch.testing.assert_close(cache.layers[layer].keys, one.layers[layer].keys,
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.layers[layer].values, one.layers[layer].values,
                                       atol=1e-5, rtol=1e-5)
        answers[chunk] = _answer(model, method, cache, question, 12, set(), torch.device("cpu"))
    assert answers[64] == answers[None] and answers[50] == answers[None]
    assert len(answers[None]) == 12


FULL_BUDGET = {
    "oracle_topk": {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 1.0}},
    "hashattn": {"hash": {"_target_": "sa_bench.attention.hashattn.HashAttention", "heavy_size": 1.0}},
    "random_projection_topk": {"rp": {"_target_": "sa_bench.attention.hashattn.RandomProjectionTopK",
                                      "heavy_size": 1.0}},
    "quest": {"quest": {"_target_": "sa_bench.attention.maskers.Quest", "heavy_size": 1.0}},
    "oracle_topp": {"topp": {"_target_": "sa_bench.attention.maskers.OracleTopP", "top_p": 1.0}},
    "random_sampling": {"sample": {"_target_": "sa_bench.attention.maskers.RandomSampling",
                                   "rate": 1.0}},
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_methods_equal_dense(arch, name, install, tmp_path):
    from sa_bench.attention.hashattn import HashWeights

    model, ref = make(arch)
    data = load(name)
    data["maskers"] = {**data["maskers"], **FULL_BUDGET[name]}
    if name == "hashattn":  # weights of the test model's shapes (2 layers, 4 heads, dim 16)
        HashWeights.init(2, 4, 16, bits=8).save(tmp_path / "hash.safetensors")
        data["maskers"]["hash"]["weights"] = str(tmp_path / "hash.safetensors")
    method = SparseMethod.from_config(data)
    install(method, model)
    tokens = ids(120)
    got, _ = run_protocol(model, method, tokens, 80, 20, 5, chunk=32)
    want, _ = run_protocol(ref, None, tokens, 80, 20, 5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_installed_leaves_no_global_state(install):
    """After the block: the model's own attention is back, both registry entries are gone, the
    method's key caches are empty; an error inside the block restores the same."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model, _ = make("llama")
    before = model.config._attn_implementation
    method = SparseMethod.from_config(load("quest"))
    tokens = ids(120)
    with method.installed(model):
        assert model.config._attn_implementation == method.name
        assert method.name in AttentionInterface._global_mapping
        assert method.name in AttentionMaskInterface._global_mapping
        run_protocol(model, method, tokens, 80, 20, 2)
        assert method.maskers["quest"].__dict__  # ran
    assert model.config._attn_implementation == before
    assert method.name not in AttentionInterface._global_mapping
    assert method.name not in AttentionMaskInterface._global_mapping
    assert not any(name.startswith("sa_bench_") for name in AttentionInterface._global_mapping)
    caches = [v for m in method.maskers.values() for v in vars(m).values()
              if hasattr(v, "length")]
    assert all(not c.length for c in caches)
    with pytest.raises(RuntimeError, match="boom"):
        with method.installed(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert method.name not in AttentionInterface._global_mapping


def test_every_config_builds_and_runs(install):
    tokens = ids(110)
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, "*.yaml")))
    assert {"dense", "streaming", "oracle_topk", "oracle_topp", "hashattn", "quest",
            "double_sparsity", "random_sampling", "magicpig", "vattention"} <= set(names)
    for name in names:
        model, _ = make("llama")
        method = SparseMethod.from_config(load(name, measure_error=True))
        install(method, model)
        run_protocol(model, method, tokens, 90, 10, 3)
        stats = method.stats()
        json.dumps(stats)
        assert len(stats["density"]["question"]) == 2 and len(stats["error"]["decode"]) == 2
        fixed = sum(m.size for m in method.maskers.values() if isinstance(m, (Sink, Local)))
        if method.maskers and fixed < tokens.shape[-1]:
            assert all(0 < d < 1 for d in stats["density"]["decode"]), name
            assert all(e > 0 for e in stats["error"]["decode"]), name
        elif method.maskers:  # sink + local cover these 110 tokens (pqcache: 128 + 128)
            assert stats["density"]["decode"] == [1.0, 1.0], name
        else:  # dense, or a sparse prefill with dense decode
            assert stats["density"]["decode"] == [1.0, 1.0], name
        if method.prefill is not None:  # at 90 context tokens the authors' sizes keep every pair
            assert stats["density"]["prefill"] == [1.0, 1.0], name
            assert stats["prefill_estimated_on"] == "prompt", name  # one pass


def test_phase_decode_and_dense_layers(install):
    model, ref = make("qwen2")
    data = load("streaming", phase="decode", dense_layers=[1], measure_error=True)
    method = SparseMethod.from_config(data)
    install(method, model)
    tokens = ids(150)
    got, _ = run_protocol(model, method, tokens, 120, 20, 3)
    want, _ = run_protocol(ref, None, tokens, 120, 20, 3)
    torch.testing.assert_close(got[:, :21], want[:, :21], atol=2e-5, rtol=1e-4)  # dense so far
    assert not torch.allclose(got[:, 21:], want[:, 21:], atol=1e-3)
    stats = method.stats()
    assert stats["density"]["question"] == [1.0, 1.0]
    assert stats["density"]["decode"][1] == 1.0 and stats["density"]["decode"][0] < 0.6
    assert stats["error"]["decode"][1] == 0.0 and stats["error"]["decode"][0] > 0


def test_density_statistic_matches_budget(install):
    model, _ = make("mistral")
    data = load("oracle_topk")
    data["maskers"] = {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 0.1}}
    method = SparseMethod.from_config(data)
    install(method, model)
    run_protocol(model, method, ids(1100), 1000, 50, 4)
    for phase in ("question", "decode"):
        for d in method.stats()["density"][phase]:
            assert abs(d - 0.1) < 0.001


def test_key_caches_survive_crop_and_reset(install):
    """hashattn / double sparsity / magicpig keep per-layer key features; after crop they must
    equal a fresh run (the runner crops the cache back to the context between questions)."""
    model, _ = make("llama")
    tokens = ids(200)
    ctx_len = 120
    for name in ("hashattn", "double_sparsity", "magicpig"):
        method = SparseMethod.from_config(load(name))
        install(method, model)
        run_protocol(model, method, tokens, ctx_len, 30, 4)  # question 1 (longer)
        # question 2 on the same context, after crop
        _, cache = run_protocol(model, method, tokens, ctx_len, 30, 0)
        method.reset()
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            method.set_phase("prefill")
            model(tokens[:, :ctx_len], past_key_values=cache)
            method.set_phase("question")
            model(tokens[:, 150:180], past_key_values=cache)
            method.set_phase("decode")
            model(tokens[:, 180:181], past_key_values=cache)
            cache.crop(ctx_len - cache.get_seq_length())
            method.set_phase("question")
            q2 = torch.cat([model(tokens[:, 160:170], past_key_values=cache).logits,
                            model(tokens[:, 170:171], past_key_values=cache).logits], 1)
        fresh = SparseMethod.from_config(load(name))
        model2, _ = make("llama")
        install(fresh, model2)
        cache = DynamicCache(config=model2.config)
        with torch.no_grad():
            fresh.set_phase("prefill")
            model2(tokens[:, :ctx_len], past_key_values=cache)
            fresh.set_phase("question")
            want = torch.cat([model2(tokens[:, 160:170], past_key_values=cache).logits,
                              model2(tokens[:, 170:171], past_key_values=cache).logits], 1)
        if name == "magicpig":  # random hyperplanes differ between the runs; only shapes/finite
            assert torch.isfinite(q2).all()
        else:
            torch.testing.assert_close(q2, want, atol=1e-5, rtol=1e-5)


def test_install_refuses_a_missing_layer(install):
    model, _ = make("llama")
    method = SparseMethod.from_config(load("streaming", dense_layers=[5]))
    with pytest.raises(ConfigError, match=r"sparse\.dense_layers\[0\]"):
        install(method, model)
