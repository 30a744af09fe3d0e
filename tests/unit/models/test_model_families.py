"""Model families on tiny random-weight models: Llama, Qwen2.5, Qwen3 (QK-norm), Mistral
(sliding window), Phi-3.5, GPT-OSS (learned sinks, alternating sliding / full layers),
Gemma-3-style sliding layers, and LFM2 (a hybrid of convolution and attention layers).

For each: (a) `sparse=dense` equals the model's own attention, (b) sparse methods run only
in attention layers, select only keys a layer's window allows, keep GPT-OSS's sinks in the
softmax (full-budget methods equal dense; the kernels against a brute-force reference), and
(c) a job runs end to end on a local copy saved with a tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

from sa_bench.attention import SparseMethod
from sa_bench.config import ConfigError
from tests.conftest import run_sa_bench
from tests.unit.attention.test_attention_hook import ids, load, run_protocol

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

WINDOW = 16
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, head_dim=16, vocab_size=260, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2.5": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW}),
    "phi3.5": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "gpt-oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2,
                 "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               {"sliding_window": WINDOW,
                "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "lfm2": (tf.Lfm2Config, tf.Lfm2ForCausalLM, {"full_attn_idxs": [1, 3]}),
}
ATTENTION_LAYERS = {"lfm2": {1, 3}}
WINDOWED = {"mistral": {0, 1, 2, 3}, "gpt-oss": {0, 2}, "gemma3": {0, 2}}
TOKENS = ids(70) % 260  # a 50-token context, a 12-token question, 8 decode steps
CTX, QUESTION, STEPS = 50, 12, 8


def config(family: str):
    cfg_cls, _, extra = FAMILIES[family]
    return cfg_cls(**{**SMALL, **extra})


def make(family: str, attn: str | None = None):
    """(model, a copy of it on the model's own attention, or on `attn`)."""
    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config(family)).eval()
    for module in model.modules():  # GPT-OSS: sinks far from 0, so losing them shows
        if hasattr(module, "sinks"):
            torch.nn.init.normal_(module.sinks, 0.0, 2.0)
    ref = model_cls(config(family)).eval()
    ref.load_state_dict(model.state_dict())
    if attn is not None:
        ref.set_attn_implementation(attn)
    return model, ref


def reference(ref):
    return run_protocol(ref, None, TOKENS, CTX, QUESTION, STEPS)[0]


# --- (a) dense equals the model's own attention ----------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_equals_the_models_own_attention(family, install):
    """On the default kernel (SDPA, or our blocked sink kernel for GPT-OSS, whose own is
    eager) within float32 rounding, chunked prefill included; on `eager`, exactly."""
    model, ref = make(family)
    stock = ref.config._attn_implementation
    assert stock == ("eager" if family == "gpt-oss" else "sdpa")
    want = reference(ref)
    method = SparseMethod.from_config(load("dense"))
    install(method, model)
    got = run_protocol(model, method, TOKENS, CTX, QUESTION, STEPS, chunk=16)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    decode = method.stats()["density"]["decode"]
    assert [i for i, d in enumerate(decode) if d is not None] == sorted(
        ATTENTION_LAYERS.get(family, range(4)))

    exact_model, eager_ref = make(family, "eager")
    exact = SparseMethod.from_config(load("dense"))
    install(exact, exact_model, "eager")
    assert torch.equal(run_protocol(exact_model, exact, TOKENS, CTX, QUESTION, STEPS)[0],
                       reference(eager_ref))


# --- (b) sparse methods: attention layers only, windows, sinks --------------------------------

FULL = {
    "oracle_topk": {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 1.0}},
    "streaming": {"sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": 4},
                  "local": {"_target_": "sa_bench.attention.maskers.Local", "size": 1.0}},
    "per_kv_head": {"sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": 2},
                    "topk": {"_target_": "sa_bench.attention.maskers.OracleTopK",
                             "heavy_size": 1.0, "per_kv_head": True}},
    "quest": {"quest": {"_target_": "sa_bench.attention.maskers.Quest", "heavy_size": 1.0}},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_methods_equal_the_model(family, install):
    """Every key a layer may see, selected through each kernel path, gives the model's own
    logits: the window and (GPT-OSS) the sinks are applied as the model applies them."""
    model, ref = make(family)
    want = reference(ref)
    for name, maskers in FULL.items():
        method = SparseMethod.from_config({**load("oracle_topk"), "maskers": maskers})
        with method.installed(model):
            got = run_protocol(model, method, TOKENS, CTX, QUESTION, STEPS, chunk=16)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"{family} {name}")


SMALL_BUDGET = {
    "sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": 2},
    "local": {"_target_": "sa_bench.attention.maskers.Local", "size": 4},
    "topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 24},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_selections_stay_in_attention_layers_and_windows(family, install, monkeypatch):
    """A method whose budget (30 keys) exceeds the window (16) selects, in a sliding layer,
    only keys the window allows (never more than it); it is called in attention layers only."""
    import sa_bench.attention.driver as driver

    seen: dict[int, list] = {}
    real = driver.sparse_attention

    def spy(ctx, value, sel, workspace):
        sel = sel.indexed()
        rows = sel.idx.clamp(max=ctx.kv - 1)
        allowed = ctx.allowed.expand(*sel.idx.shape[:3], ctx.kv).gather(-1, rows)
        assert bool((allowed | ~sel.valid).all()), "a key outside the mask was selected"
        seen.setdefault(ctx.layer, []).append(int(sel.count().max()))
        return real(ctx, value, sel, workspace)

    monkeypatch.setattr(driver, "sparse_attention", spy)
    model, ref = make(family)
    method = SparseMethod.from_config({**load("oracle_topk"), "maskers": SMALL_BUDGET})
    install(method, model)
    run_protocol(model, method, TOKENS, CTX, QUESTION, STEPS)
    assert set(seen) == set(ATTENTION_LAYERS.get(family, range(4)))
    for layer, counts in seen.items():
        limit = WINDOW if layer in WINDOWED.get(family, ()) else 30
        assert max(counts) <= limit, (family, layer, counts)
        if layer in WINDOWED.get(family, ()):
            assert max(counts) == WINDOW  # the whole window fits the budget
    density = method.stats()["density"]["decode"]
    for layer in range(4):
        assert (density[layer] is None) == (layer not in seen)


@pytest.mark.parametrize("maskers", [
    {"sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": 3},
     "local": {"_target_": "sa_bench.attention.maskers.Local", "size": 5}},
    {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 7}},
    {"sample": {"_target_": "sa_bench.attention.maskers.RandomSampling", "rate": 0.3}},
    {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "heavy_size": 0.9}},
], ids=["shared", "per_head", "sampled", "large"])
@pytest.mark.parametrize("rows", [1, 9])
def test_sparse_kernels_put_sinks_in_the_softmax(maskers, rows):
    """Against a brute-force reference: softmax over [w_j exp(q.k_j s) for selected j, the
    head's sink] (the sink's column dropped) times v, on every kernel path."""
    import sa_bench.attention.driver as driver
    from sa_bench.attention.gather import Workspace

    g = torch.Generator().manual_seed(3)
    b, h, hk, kv, d = 1, 4, 2, 40, 16
    query, key, value = (torch.randn(b, n, r, d, generator=g) for n, r in ((h, rows), (hk, kv), (hk, kv)))
    sinks = torch.randn(h, generator=g) * 3
    method = SparseMethod.from_config({**load("oracle_topk"), "maskers": maskers})
    captured = []
    real = driver.sparse_attention

    def keep(ctx, v, sel, workspace):
        captured.append(sel.indexed())
        return real(ctx, v, sel, workspace)

    driver.sparse_attention, saved = keep, driver.sparse_attention
    try:
        out, *_ = driver.attend_blocks(method.maskers.values(), query, key, value, None, 0.25, 0,
                                       torch.Generator().manual_seed(0), Workspace(), 2**20,
                                       sinks=sinks)
    finally:
        driver.sparse_attention = saved
    sel, = captured
    scores = torch.matmul(query, key.repeat_interleave(h // hk, 1).transpose(-1, -2)) * 0.25
    logw = torch.full_like(scores, float("-inf")).scatter_(
        -1, sel.idx.clamp(max=kv - 1), torch.where(sel.valid, sel.logw, float("-inf")))
    logits = torch.cat([scores + logw, sinks.view(1, h, 1, 1).expand(b, h, rows, 1)], -1)
    want = torch.matmul(torch.softmax(logits, -1)[..., :-1], value.repeat_interleave(h // hk, 1))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# --- refusals ---------------------------------------------------------------------------------

def test_sparse_prefill_is_refused_with_sinks_and_sliding_windows():
    for family, reason in (("gpt-oss", "gpt_oss has learned attention sinks"),
                           ("mistral", "mistral has sliding-window attention layers"),
                           ("gemma3", "gemma3_text has sliding-window attention layers")):
        model, _ = make(family)
        method = SparseMethod.from_config(load("a_shape"))
        with pytest.raises(ConfigError, match=f"sparse.prefill: model type {reason}"):
            with method.installed(model):
                pass
        assert model.config._attn_implementation != method.name  # nothing left installed
    model, _ = make("llama")
    with SparseMethod.from_config(load("a_shape")).installed(model):
        pass


def test_dense_layers_must_be_attention_layers():
    model, _ = make("lfm2")
    method = SparseMethod.from_config(load("streaming", dense_layers=[0]))
    with pytest.raises(ConfigError, match=r"sparse.dense_layers\[0\]: layer 0 of lfm2 is not an "
                                          r"attention layer \(conv\)"):
        with method.installed(model):
            pass
    with SparseMethod.from_config(load("streaming", dense_layers=[1])).installed(model):
        pass


# --- (c) end to end ---------------------------------------------------------------------------

@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_jobs_run_end_to_end_for_every_family(tmp_path):
    """One sweep over a local copy of each tiny model (the embedded byte tokenizer, vocab 260),
    dense and a sparse method, 2 passkey samples of 1k tokens: prefill in chunks, question and
    decode, the cache rewound between samples (sliding and convolution layers included)."""
    from sa_bench.models.loading import embedded_dir

    tok = embedded_dir("tiny-retrieval")
    dirs = []
    for family in FAMILIES:
        model, _ = make(family)
        path = tmp_path / "models" / family.replace(".", "_")
        model.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tok) / name, path / name)
        dirs.append(str(path))
    root = tmp_path / "out"
    proc = run_sa_bench("model.name=x", f"model.pretrained={','.join(dirs)}", "model.prefill_chunk=300",
                        "sparse=dense,streaming", "benchmark.n_samples=2", "benchmark.subsets=[1k]",
                        "pool.devices=cpu", root=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = sorted(root.rglob("done.json"))
    assert len(done) == 2 * len(FAMILIES), proc.stdout[-2000:]
    for marker in done:
        lines = (marker.parent / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 2


@pytest.mark.parametrize("family", ["mistral", "gpt-oss", "lfm2"])
def test_rewind_restores_windows_and_convolution_states(family, install):
    """After a question the cache returns to the context: a sliding layer past its window
    and a convolution layer cannot be cropped, so they come back from the state kept after
    the prefill; the next question's answer equals one from a fresh prefill."""
    from sa_bench.runner import _answer, _prefill, _rewind

    model, _ = make(family)
    method = SparseMethod.from_config(load("streaming"))
    install(method, model)
    context = tuple((ids(60, seed=4)[0] % 260).tolist())
    first, second = ((ids(6, seed=s)[0] % 260).tolist() for s in (8, 9))
    cpu = torch.device("cpu")
    cache, n, _ = _prefill(model, method, context, cpu, 16)
    _answer(model, method, cache, first, 10, set(), cpu)
    _rewind(cache, n)
    again = _answer(model, method, cache, second, 10, set(), cpu)
    fresh, _, _ = _prefill(model, method, context, cpu, 16)
    assert again == _answer(model, method, fresh, second, 10, set(), cpu)
