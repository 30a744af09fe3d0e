"""Issue 21 item 9: kernel launches and host syncs of one decode call per layer, counted on CPU
with the accelerator's branches forced (`sa_bench.perf.counts`), on the batched gather paths
`perf.attention` counts (`BATCHED_GATHER`), at the timed shape (32 query / 8 kv heads, head dim
128, 4k keys). Exact counts: a regression in either number fails here."""

from __future__ import annotations

import contextlib
import types
from argparse import Namespace

import pytest

torch = pytest.importorskip("torch")

from sa_bench.attention.gather import BATCHED_GATHER  # noqa: E402
from sa_bench.attention.kernels import value_gather  # noqa: E402
from sa_bench.attention.ops import accelerator_paths  # noqa: E402
from sa_bench.perf import attention as perf  # noqa: E402
from sa_bench.perf.counts import device_work  # noqa: E402

# method: (launches, syncs) of a decode call. Before issue 21 item 9: oracle_topk 67/0, quest
# 95/0, double_sparsity 106/0, hashattn 115/0, random_projection_topk 95/0, streaming 3/0,
# random_sampling 88/1, vattention 189/3, magicpig 171/5, oracle_topp 108/4; after its first
# round: 16, 44, 56, 41, 32, 3, 62/1, 149/3, 135/5, 83/4 (counting a wrapped Python number's
# `scalar_tensor` as a launch, 0-4 of each); after its second: random_sampling 43/1,
# vattention 107/2, magicpig 108/2, oracle_topp 60/1; before the round for the approximate top-k
# family: quest 30, double_sparsity 42, hashattn 34, random_projection_topk 25
COUNTS = {
    "oracle_topk": (13, 0),
    "quest": (20, 0),
    "double_sparsity": (24, 0),
    "hashattn": (24, 0),
    "random_projection_topk": (23, 0),
    "streaming": (3, 0),
    "random_sampling": (42, 1),
    "vattention": (54, 1),
    "magicpig": (60, 1),
    "oracle_topp": (48, 0),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return perf.model_files(tmp_path_factory.mktemp("files"), 32, 8, 128)


def decode_work(name: str, files, kv: int = 4099):
    torch.manual_seed(0)
    h, hk, d = 32, 8, 128
    method = perf.load_method(name, Namespace(heads=h, kv_heads=hk, head_dim=d), files)
    method.gather_costs = BATCHED_GATHER
    module = types.SimpleNamespace(layer_idx=0, training=False)
    key, value = torch.randn(1, hk, kv, d), torch.randn(1, hk, kv, d)
    with accelerator_paths():  # the context, on the same paths (the constants they cache)
        method.attention(module, torch.randn(1, h, 1, d), key, value, None, d**-0.5)
    key = torch.cat([key, torch.randn(1, hk, 1, d)], 2)
    value = torch.cat([value, torch.randn(1, hk, 1, d)], 2)
    query = torch.randn(1, h, 1, d)
    with device_work() as work:
        method.attention(module, query, key, value, None, d**-0.5)
    return work


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_launches_and_syncs_per_decode_layer(name, files):
    work = decode_work(name, files)
    assert (work.launches, work.syncs) == COUNTS[name], (work.names, work.sync_names)


def test_targets_reached_where_they_are():
    """The issue's targets, all met at this shape: no sync for any deterministic method (the
    top-k family, Quest, HashAttention, Double Sparsity, random projections, streaming, oracle
    top-p); <= 25 launches for the top-k family, Quest and streaming; <= 1 sync and <= 60
    launches for the sampled ones (random sampling, vAttention, MagicPIG); <= 60 for oracle
    top-p."""
    topk = ("oracle_topk", "quest", "double_sparsity", "hashattn", "random_projection_topk",
            "streaming")
    for name in (*topk, "oracle_topp"):
        assert COUNTS[name][1] == 0
    for name in topk:
        assert COUNTS[name][0] <= 25
    for name in ("random_sampling", "vattention", "magicpig"):
        assert COUNTS[name][1] <= 1 and COUNTS[name][0] <= 60
    assert COUNTS["oracle_topp"][0] <= 60


@pytest.mark.parametrize("name", ["quest", "quest/kv", "hashattn", "double_sparsity",
                                  "random_projection_topk"])
def test_accelerator_paths_select_the_cpu_keys(name, files, monkeypatch):
    """The approximate top-k family's accelerator branches (Quest's selection compacted to its
    budget, signature scores from byte lookups, labels and hashes of the new key and the query
    in one pass) select the keys the CPU branches select, with the same weights, over decode
    steps and new cells of other lengths and dtypes (per-cell caches made again); Quest's
    compacted selection in short contexts too (every page taken; too few candidates: the
    padded entries)."""
    from sa_bench.attention import driver

    seen = []
    real = driver.sparse_attention

    def spy(ctx, value, sel, workspace):
        keys = torch.where(sel.valid, sel.idx, ctx.kv).sort(-1).values
        seen.append((keys[..., :int((keys < ctx.kv).sum(-1).max())],
                     sel.logw.masked_fill(~sel.valid, 0.0).sum(-1)))
        return real(ctx, value, sel, workspace)

    monkeypatch.setattr(driver, "sparse_attention", spy)
    h, hk, d = 32, 8, 128
    module = types.SimpleNamespace(layer_idx=0, training=False)
    runs = []
    for forced in (False, True):
        torch.manual_seed(0)
        method = perf.load_method(name, Namespace(heads=h, kv_heads=hk, head_dim=d), files)
        method.gather_costs = BATCHED_GATHER
        seen.clear()
        outs = []
        for kv, dtype in ((69, torch.float32), (90, torch.float32), (700, torch.float32),
                          (333, torch.bfloat16)):
            method.reset()
            key, value = torch.randn(1, hk, kv, d, dtype=dtype), torch.randn(1, hk, kv, d, dtype=dtype)
            method.attention(module, torch.randn(1, h, 1, d, dtype=dtype), key, value, None, d**-0.5)
            for _ in range(3):
                key = torch.cat([key, torch.randn(1, hk, 1, d, dtype=dtype)], 2)
                value = torch.cat([value, torch.randn(1, hk, 1, d, dtype=dtype)], 2)
                query = torch.randn(1, h, 1, d, dtype=dtype)
                with accelerator_paths() if forced else contextlib.nullcontext():
                    outs.append(method.attention(module, query, key, value, None, d**-0.5)[0])
        runs.append((list(seen), outs, method.stats()["density"]["decode"]))
    (sel_cpu, out_cpu, density_cpu), (sel_acc, out_acc, density_acc) = runs
    assert len(sel_cpu) == len(sel_acc) == 16
    for (keys, weights), (keys_acc, weights_acc) in zip(sel_cpu, sel_acc, strict=True):
        assert torch.equal(keys, keys_acc) and torch.equal(weights, weights_acc)
    for cpu, acc in zip(out_cpu, out_acc, strict=True):
        tol = 1e-5 if cpu.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(acc, cpu, rtol=tol, atol=tol)
    assert density_cpu == density_acc


def test_counter_sees_syncs_and_launches():
    x = torch.arange(10.0)
    with device_work() as work:
        y = x * 2  # a launch
        _ = y[1:]  # a view: none
        bool(y.sum() > 3)  # sum, gt: launches; the read: a sync
        (y > 4).nonzero()  # gt: a launch; nonzero: a sync
        y.tolist()
    assert work.launches == 4 and work.syncs == 3, (work.names, work.sync_names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_gather_accelerator_branch_equals_embedding_bag(dtype):
    """Issue 21 item 6: off CPU the values are gathered by index_select + a batched matmul (CUDA's
    embedding_bag walks each bag serially); forced on CPU it gives embedding_bag's output."""
    g = torch.Generator().manual_seed(1)
    v_rows = torch.randn(500, 64, generator=g).to(dtype)
    flat = torch.randint(0, 500, (2, 4, 3, 37), generator=g)
    p = torch.softmax(torch.randn(2, 4, 3, 37, generator=g), -1)
    cpu = value_gather(v_rows, flat, p)
    with device_work() as work:
        forced = value_gather(v_rows, flat, p)
    assert "_embedding_bag_forward_only" not in work.names and "_embedding_bag" not in work.names
    assert work.names["index_select"] == 1 and work.names["bmm"] == 1
    torch.testing.assert_close(forced.float(), cpu.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)
    with accelerator_paths():
        assert value_gather(v_rows, flat, p).shape == (2 * 4 * 3, 64)


@pytest.mark.parametrize("name", ["oracle_topk", "quest", "hashattn", "random_projection_topk",
                                  "double_sparsity", "random_sampling", "streaming", "oracle_topp",
                                  "magicpig"])
def test_forced_accelerator_paths_give_the_cpu_output(name, files):
    """The decode call on the accelerator's branches (cached constants, known budgets, table
    popcount, q @ k^T, index_select value gather) equals the CPU branches' output. vAttention
    draws its samples otherwise on each (another random stream, the same distribution:
    `test_vattention_accelerator_ranking_samples_m_keys_without_bias`)."""
    torch.manual_seed(0)
    h, hk, d, kv = 32, 8, 128, 700
    args = Namespace(heads=h, kv_heads=hk, head_dim=d)
    module = types.SimpleNamespace(layer_idx=0, training=False)
    key, value = torch.randn(1, hk, kv, d), torch.randn(1, hk, kv, d)
    q0, q1 = torch.randn(1, h, 1, d), torch.randn(1, h, 1, d)
    outs, densities = [], []
    for forced in (False, True):
        method = perf.load_method(name, args, files)
        method.gather_costs = BATCHED_GATHER
        method.attention(module, q0, key[:, :, :-1], value[:, :, :-1], None, d**-0.5)
        if forced:
            with accelerator_paths():
                out, _ = method.attention(module, q1, key, value, None, d**-0.5)
        else:
            out, _ = method.attention(module, q1, key, value, None, d**-0.5)
        outs.append(out)
        densities.append(method.stats()["density"]["decode"])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert densities[0] == densities[1]


@pytest.mark.parametrize("bits, tables, syncs", [(10, 150, 1), (2, 8, 2)])
def test_magicpig_reads_its_widest_row_only_when_the_bound_is_too_wide(bits, tables, syncs):
    """On an accelerator MagicPIG's hit lists are as wide as a bound read with the runs'
    lengths (one sync); when lists that wide would gather more rows than all the keys (here
    2-bit codes: most keys collide), the widest row's count is read too. Either way the keys,
    weights and output are the CPU path's (which reads the exact width)."""
    from sa_bench.attention.magicpig import MagicPig
    from sa_bench.attention.maskers import Local, Sink
    from sa_bench.attention.method import SparseMethod

    g = torch.Generator().manual_seed(4)
    h, hk, d, kv = 8, 2, 32, 2000
    key, value = torch.randn(1, hk, kv, d, generator=g), torch.randn(1, hk, kv, d, generator=g)
    queries = torch.randn(2, 1, h, 1, d, generator=g)
    module = types.SimpleNamespace(layer_idx=0, training=False)
    outs, densities, counted = [], [], []
    for forced in (False, True):
        method = SparseMethod.from_config({"name": "t", "maskers": {}})
        method.maskers = {"sink": Sink(size=4), "local": Local(size=64),
                          "lsh": MagicPig(lsh_bits=bits, lsh_tables=tables)}
        method.num_layers = 1
        method.set_phase("decode")
        method.attention(module, queries[0], key[:, :, :-1], value[:, :, :-1], None, d**-0.5)
        if forced:
            with device_work() as work:
                out, _ = method.attention(module, queries[1], key, value, None, d**-0.5)
            counted.append(work.syncs)
        else:
            out, _ = method.attention(module, queries[1], key, value, None, d**-0.5)
        outs.append(out)
        densities.append(method.stats()["density"]["decode"])
    assert counted == [syncs]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert densities[0] == densities[1]
