"""The hook on CUDA: dense on eager is exact, on the fast kernel close, full budgets match eager,
every method runs in bf16."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONF = str(ROOT / "conf" / "sparse")
SMALL = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, vocab_size=300)


def load(name):
    with open(os.path.join(CONF, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def protocol(model, method, tokens, ctx_len=900, q_len=40, steps=8):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    outs = []
    with torch.no_grad():
        for phase, chunk in [("prefill", tokens[:, :ctx_len]),
                             ("question", tokens[:, ctx_len:ctx_len + q_len])]:
            if method:
                method.set_phase(phase)
            outs.append(model(chunk, past_key_values=cache).logits)
        if method:
            method.set_phase("decode")
        for i in range(steps):
            pos = ctx_len + q_len + i
            outs.append(model(tokens[:, pos:pos + 1], past_key_values=cache).logits)
    return torch.cat(outs, 1).float()


def _fast_kernel(dtype):
    from sa_bench.attention.dense import resolve_implementation

    return resolve_implementation("auto", torch.device("cuda"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dense_exact_and_full_budget_close(dtype, install):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sa_bench.attention import SparseMethod

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL)).eval().to("cuda", dtype)
    tokens = torch.randint(0, 300, (1, 960), device="cuda")
    base.set_attn_implementation("eager")
    want = protocol(base, None, tokens)
    exact = SparseMethod.from_config(load("dense"))
    with exact.installed(base, "eager"):
        assert torch.equal(protocol(base, exact, tokens), want)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    fast = SparseMethod.from_config(load("dense"))
    with fast.installed(base, _fast_kernel(dtype)):
        torch.testing.assert_close(protocol(base, fast, tokens), want, atol=tol, rtol=tol)
    data = load("oracle_topk")
    data["maskers"]["topk"]["heavy_size"] = 1.0
    method = SparseMethod.from_config(data)
    install(method, base)
    torch.testing.assert_close(protocol(base, method, tokens), want, atol=tol, rtol=tol)


def test_cuda_every_method_runs_bf16(install, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sa_bench.attention import SparseMethod
    from sa_bench.perf.attention import model_files

    files = str(model_files(tmp_path, 8, 2, 32, layers=2))  # hashattn / double_sparsity files for SMALL

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval().to("cuda", torch.bfloat16)
    tokens = torch.randint(0, 300, (1, 960), device="cuda")
    for path in sorted(glob.glob(os.path.join(CONF, "*.yaml"))):
        data = yaml.safe_load(open(path).read().replace("${model.pretrained}", files))
        data["measure_error"] = True
        method = SparseMethod.from_config(data)
        install(method, model)
        logits = protocol(model, method, tokens)
        assert torch.isfinite(logits).all(), path
        stats = method.stats()
        for phase in ("question", "decode"):
            assert all(d is not None and 0 < d <= 1 for d in stats["density"][phase]), path
            assert all(e is not None and e == e for e in stats["error"][phase]), path


@pytest.mark.parametrize("q,kv", [(1, 4096), (9, 4096), (512, 8192)])
def test_masked_gqa_sdpa_runs_on_flash_or_efficient_kernels(q, kv):
    """Issue 21 item 7: masked dense attention with GQA (prefill chunks after the first,
    padding, the dense question phase) on CUDA uses flash or memory-efficient kernels only: a
    silent fallback to the math kernel (float32, ~20 GiB per block at 128k) fails here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sa_bench.attention import dense

    g = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(1, 32, q, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    key = torch.randn(1, 8, kv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    value = torch.randn(1, 8, kv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    allowed = torch.arange(kv, device="cuda")[None, :] <= (kv - q + torch.arange(q, device="cuda"))[:, None]
    allowed[:, :5] = False  # padding
    module = type("M", (), {"training": False})()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        got = dense.dense_attention(module, query, key, value, allowed[None, None], 128 ** -0.5, "sdpa")
        causal = dense.dense_attention(module, query, key, value, None, 128 ** -0.5, "sdpa")
    want = dense.dense_attention(module, query.float(), key.float(), value.float(), allowed[None, None],
                                 128 ** -0.5, "sdpa")
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert causal.shape == got.shape


@pytest.mark.parametrize("name", ["dense", "quest", "knorm"])
def test_presized_cache_decodes_in_place_on_flash_or_efficient_kernels(install, monkeypatch, name):
    """Issue 21 item 8 on CUDA (bf16): with the job's pre-sized cache no decode step writes a
    tensor of a whole cache layer, the question and decode steps run on flash or
    memory-efficient SDPA kernels over the strided views of the buffer, and the greedy tokens
    equal those of transformers' DynamicCache path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.unit.attention.test_kv_cache import answers

    cuda = torch.device("cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        new = answers(install, name, True, monkeypatch, cuda, torch.bfloat16)
        old = answers(install, name, False, monkeypatch, cuda, torch.bfloat16)
    assert sum(new["writes"].values()) == 0, new["writes"]
    assert old["writes"]["cat"] > 0
    assert new["tokens"] == old["tokens"]
    for a, b in zip(new["logits"], old["logits"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
