"""Maskers against brute-force references on random tensors (GQA shapes included)."""

from __future__ import annotations

import itertools
import math
import os
import types

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from sa_bench.attention.dense import eager_attention  # noqa: E402
from sa_bench.attention.double_sparsity import DoubleSparsity, kv_head_channels  # noqa: E402
from sa_bench.attention.driver import attend_blocks, decode_spans  # noqa: E402
from sa_bench.attention.gather import GatherCosts, Workspace  # noqa: E402
from sa_bench.attention.hashattn import RandomProjectionTopK  # noqa: E402
from sa_bench.attention.kernels import sparse_attention  # noqa: E402
from sa_bench.attention.magicpig import MagicPig  # noqa: E402
from sa_bench.attention.maskers import (  # noqa: E402
    AdaptiveSampling,
    Local,
    OracleTopK,
    OracleTopP,
    Quest,
    RandomSampling,
    Sink,
)
from sa_bench.attention.method import SparseMethod  # noqa: E402
from sa_bench.attention.ops import accelerator_paths, allowed_from_mask, compact  # noqa: E402
from sa_bench.attention.selection import Context, Selection  # noqa: E402
from sa_bench.config import ConfigError  # noqa: E402

MODULE = types.SimpleNamespace(layer_idx=0, training=False)


def tensors(b=1, h=4, hk=2, q=1, kv=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, h, q, d, generator=g)
    key = torch.randn(b, hk, kv, d, generator=g)
    value = torch.randn(b, hk, kv, d, generator=g)
    return query, key, value


def context(query, key, mask=None, seed=0):
    b, _, q, _ = query.shape
    allowed = allowed_from_mask(mask, b, q, key.shape[2], query.device)
    return Context(query, key, query.shape[-1] ** -0.5, 0, allowed,
                   torch.Generator().manual_seed(seed))


def run(maskers, query, key, seed=0):
    ctx = context(query, key, seed=seed)
    sel = Selection.empty(query.shape[0], query.shape[1], query.shape[2], query.device)
    for m in maskers:
        sel = m.select(ctx, sel)
    return ctx, sel


def row_sets(sel):
    """{(b, h, i): set of valid key indices}; also checks there are no duplicates."""
    sel = sel.indexed()  # a dense part (oracle top-p) as index lists
    out = {}
    b, h, q, _ = sel.idx.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(q):
                keys = sel.idx[bi, hi, i][sel.valid[bi, hi, i]].tolist()
                assert len(keys) == len(set(keys)), "duplicate key in a row"
                out[bi, hi, i] = set(keys)
    return out


def causal_keys(kv, q, i):
    return set(range(kv - q + i + 1))


def dense_out(query, key, value):
    kv, q = key.shape[2], query.shape[2]
    mask = torch.zeros(1, 1, q, kv)
    mask[..., ~allowed_from_mask(None, 1, q, kv, "cpu")[0, 0]] = torch.finfo(torch.float32).min
    out, _ = eager_attention(MODULE, query, key, value, mask, query.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # [b, H, q, d]


def check_topk(sets, prior, score, k_of, kv, q):
    """Each row: k new keys (or all candidates), every chosen one scoring >= every other."""
    for (bi, hi, i), chosen in sets.items():
        cand = causal_keys(kv, q, i) - prior[bi, hi, i]
        new = chosen - prior[bi, hi, i]
        assert prior[bi, hi, i] <= chosen
        assert new <= cand
        assert len(new) == min(k_of(len(causal_keys(kv, q, i))), len(cand))
        rest = cand - new
        if new and rest:
            s = score(bi, hi, i)
            assert min(s[j] for j in new) >= max(s[j] for j in rest) - 1e-5


@pytest.mark.parametrize("q", [1, 7])
def test_sink_and_local_are_ranges(q):
    query, key, _ = tensors(q=q, kv=50)
    _, sel = run([Sink(size=4), Local(size=8)], query, key)
    for (_, _, i), keys in row_sets(sel).items():
        t = 50 - q + i
        assert keys == set(range(4)) | set(range(max(0, t - 7), t + 1))


def test_local_fraction_and_short_rows():
    query, key, _ = tensors(q=5, kv=5)  # row i sees i + 1 keys
    _, sel = run([Sink(size=2), Local(size=0.5)], query, key)
    for (_, _, i), keys in row_sets(sel).items():
        n = i + 1
        w = round(n * 0.5)
        assert keys == set(range(min(2, n))) | set(range(n - w, n))


@pytest.mark.parametrize("q", [1, 6])
def test_oracle_topk_matches_brute_force_gqa(q):
    query, key, _ = tensors(h=8, hk=2, q=q, kv=120)
    maskers = [Sink(size=3), Local(size=5)]
    _, prior_sel = run(maskers, query, key)
    _, sel = run([*maskers, OracleTopK(heavy_size=0.2)], query, key)

    def score(bi, hi, i):
        return (key[bi, hi // 4] @ query[bi, hi, i]).tolist()

    check_topk(row_sets(sel), row_sets(prior_sel), score, lambda n: round(0.2 * n), 120, q)


def test_oracle_topp_matches_brute_force():
    query, key, _ = tensors(h=4, hk=2, q=3, kv=80)
    maskers = [Sink(size=2), Local(size=4)]
    _, prior_sel = run(maskers, query, key)
    _, sel = run([*maskers, OracleTopP(top_p=0.7)], query, key)
    prior = row_sets(prior_sel)
    for (bi, hi, i), chosen in row_sets(sel).items():
        cand = sorted(causal_keys(80, 3, i) - prior[bi, hi, i])
        s = torch.tensor([(key[bi, hi // 2, j] @ query[bi, hi, i]).item() / 4 for j in cand])
        p = torch.softmax(s, 0)
        order = p.argsort(descending=True).tolist()
        want, mass = set(), 0.0
        for o in order:
            if mass >= 0.7:
                break
            want.add(cand[o])
            mass += p[o].item()
        assert chosen - prior[bi, hi, i] == want


def test_hashattn_random_projection_matches_brute_force():
    query, key, _ = tensors(h=4, hk=2, q=2, kv=200, d=16)
    masker = RandomProjectionTopK(heavy_size=30, bits=16, seed=3)
    _, sel = run([masker], query, key)
    r = masker._proj[0]  # [Hk, d, bits]

    def score(bi, hi, i):
        sq = torch.where(query[bi, hi, i] @ r[hi // 2] >= 0, 1.0, -1.0)
        sk = torch.where(key[bi, hi // 2] @ r[hi // 2] >= 0, 1.0, -1.0)
        return ((16 + sk @ sq) / 2).tolist()  # agreeing bits

    empty = {k: set() for k in row_sets(sel)}
    check_topk(row_sets(sel), empty, score, lambda n: 30, 200, 2)


def test_quest_matches_brute_force_page_scores():
    query, key, _ = tensors(h=4, hk=2, q=1, kv=100, d=8)
    masker = Quest(heavy_size=32, page_size=8)
    _, sel = run([masker], query, key)

    def score(bi, hi, i):
        k = key[bi, hi // 2]
        qv = query[bi, hi, i]
        out = []
        for j in range(100):
            page = k[(j // 8) * 8:(j // 8) * 8 + 8]
            lo, hi_ = page.min(0).values, page.max(0).values
            out.append(torch.maximum(qv * lo, qv * hi_).sum().item())
        return out

    empty = {k: set() for k in row_sets(sel)}
    sets = row_sets(sel)
    check_topk(sets, empty, score, lambda n: 32, 100, 1)
    for keys in sets.values():  # a budget of 4 pages: exactly 4 whole pages
        assert len({j // 8 for j in keys}) == 4


def test_double_sparsity_uses_channel_subset():
    query, key, _ = tensors(h=4, hk=2, q=1, kv=90, d=16)
    masker = DoubleSparsity(heavy_size=10, channels=4, label_bits=16, calibration="online")
    masker._rank = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(h))
                                for h in range(4)]).unsqueeze(0)
    _, sel = run([masker], query, key)

    def score(bi, hi, i):  # channels per kv head: the lowest summed rank of its query heads
        ch = kv_head_channels(masker._rank[0], 2, 4)[hi // 2]  # labels and product in bfloat16
        k, q = key[bi, hi // 2][:, ch].bfloat16().float(), query[bi, hi, i][ch].bfloat16().float()
        return (k @ q).bfloat16().float().tolist()

    empty = {k: set() for k in row_sets(sel)}
    check_topk(row_sets(sel), empty, score, lambda n: 10, 90, 1)


def test_magicpig_keeps_exactly_the_colliding_keys():
    query, key, _ = tensors(h=4, hk=2, q=1, kv=150, d=16)
    masker = MagicPig(lsh_bits=3, lsh_tables=4, min_collisions=1)
    _, sel = run([masker], query, key)
    planes, mean = masker._planes[0]
    for (bi, hi, i), chosen in row_sets(sel).items():
        pl = planes[hi // 2].view(16, 4, 3)
        qb = torch.einsum("d,dlk->lk", query[bi, hi, i], pl) >= 0
        kc = key[bi, hi // 2] - mean[bi, hi // 2]
        kb = torch.einsum("nd,dlk->nlk", kc, pl) >= 0
        want = {j for j in range(150) if (kb[j] == qb).all(-1).any()}
        assert chosen == want
    # weights are 1 / p(theta)
    bi, hi = 0, 1
    j = sel.idx[bi, hi, 0][sel.valid[bi, hi, 0]][0]
    w = sel.logw[bi, hi, 0][sel.valid[bi, hi, 0]][0]
    kc = key[bi, hi // 2, j] - mean[bi, hi // 2, 0]
    cos = kc @ query[bi, hi, 0] / (kc.norm() * query[bi, hi, 0].norm())
    theta = torch.arccos(cos)
    p = 1 - (1 - (1 - theta / math.pi) ** 3) ** 4
    assert torch.allclose(w, -torch.log(p), atol=1e-4)


def test_random_sampling_size_and_weights():
    query, key, _ = tensors(h=4, hk=2, q=1, kv=400)
    _, sel = run([Sink(size=4), Local(size=16), RandomSampling(rate=0.1)], query, key)
    for (bi, hi, i), chosen in row_sets(sel).items():
        assert len(chosen) == 20 + 40
        sampled = sel.logw[bi, hi, i][sel.logw[bi, hi, i] > 0]
        assert torch.allclose(sampled, torch.full_like(sampled, math.log(380 / 40)))


# --- budgets covering all keys give dense attention -----------------------------------------

FULL = [
    [OracleTopK(heavy_size=1.0)],
    [Sink(size=4), Local(size=8), OracleTopK(heavy_size=1.0)],
    [OracleTopP(top_p=1.0)],
    [Sink(size=4), RandomProjectionTopK(heavy_size=1.0)],
    [Local(size=3), Quest(heavy_size=1.0, page_size=8)],
    [DoubleSparsity(heavy_size=1.0, channels=4, calibration="online")],
    [Sink(size=2), RandomSampling(rate=1.0)],
    [Local(size=2), AdaptiveSampling(base_rate=1.0)],
    [Sink(size=4), Local(size=8), OracleTopK(heavy_size=1.0, per_kv_head=True)],
    [Local(size=3), Quest(heavy_size=1.0, page_size=8, per_kv_head=True)],
]


@pytest.mark.parametrize("q", [1, 9])
@pytest.mark.parametrize("maskers", FULL, ids=lambda ms: "+".join(type(m).__name__ for m in ms))
def test_full_budget_equals_dense(maskers, q):
    query, key, value = tensors(h=8, hk=2, q=q, kv=120)
    ctx, sel = run(maskers, query, key)
    out = sparse_attention(ctx, value, sel, Workspace())
    torch.testing.assert_close(out, dense_out(query, key, value), atol=1e-5, rtol=1e-4)


def test_gather_path_without_exact_scores_matches_dense():
    query, key, value = tensors(h=8, hk=2, q=1, kv=120)
    ctx, sel = run([Sink(size=4), RandomProjectionTopK(heavy_size=1.0)], query, key)
    assert ctx.full_scores is None  # scores come from gathered keys
    out = sparse_attention(ctx, value, sel, Workspace())
    torch.testing.assert_close(out, dense_out(query, key, value), atol=1e-5, rtol=1e-4)


# --- sampling: the mean of many outputs approaches dense ------------------------------------


def _sharp(kv=256):
    query, key, value = tensors(h=4, hk=2, q=1, kv=kv, d=16, seed=5)
    return query * 0.5, key, value + 1.0  # values with a mean, as in real models


@pytest.mark.parametrize("masker", [
    RandomSampling(rate=0.1),
    RandomSampling(rate=0.1, per_kv_head=True),
    AdaptiveSampling(base_rate=0.05, epsilon=0.2, delta=0.1),
    MagicPig(lsh_bits=2, lsh_tables=3),
], ids=lambda m: type(m).__name__ + ("_per_kv_head" if getattr(m, "per_kv_head", False) else ""))
def test_sampling_mean_approaches_dense(masker):
    query, key, value = _sharp()
    dense = dense_out(query, key, value)
    outs, single = [], []
    for seed in range(300):
        masker.reset()
        ctx, sel = run([Sink(size=2), masker], query, key, seed=seed)
        out = sparse_attention(ctx, value, sel, Workspace())
        outs.append(out)
        single.append(((out - dense).norm() / dense.norm()).item())
    mean = torch.stack(outs).mean(0)
    err = ((mean - dense).norm() / dense.norm()).item()
    # averaging 300 draws divides the noise by ~17: what is left is not a bias
    assert err < 0.02
    assert err < 0.2 * sum(single) / len(single)


@pytest.mark.parametrize("causal", [False, True])  # R per row a tensor / an int (decode)
def test_vattention_accelerator_ranking_samples_m_keys_without_bias(causal):
    """On an accelerator vAttention takes its base sample and its sample from one ranking of
    the candidates (no read but the sample's width; the CPU draws them): each row holds m
    distinct candidates of weight R / m, and the mean of many outputs approaches dense as the
    CPU's draws do (`test_sampling_mean_approaches_dense`)."""
    query, key, value = _sharp()
    dense = dense_out(query, key, value)
    masker = AdaptiveSampling(base_rate=0.05, epsilon=0.2, delta=0.1)
    outs, single, sizes = [], [], set()
    with accelerator_paths():
        for seed in range(1000):
            ctx = context(query, key, seed=seed)
            ctx.causal = causal
            sel = Selection.empty(1, 4, 1, query.device)
            sel = masker.select(ctx, Sink(size=2).select(ctx, sel))
            if seed < 20:
                for (bi, hi, i), keys in row_sets(sel).items():  # no duplicate key
                    sampled = keys - {0, 1}
                    logw = sel.logw[bi, hi, i][sel.logw[bi, hi, i] > 0]
                    assert len(logw) == len(sampled) and len(set(logw.tolist())) == 1
                    assert len(sampled) == round(254 / math.exp(logw[0].item()))  # weight R / m
                    sizes.add(len(sampled))
            out = sparse_attention(ctx, value, sel, Workspace())
            outs.append(out)
            single.append(((out - dense).norm() / dense.norm()).item())
    assert len(sizes) > 3  # m varies with the base sample
    err = ((torch.stack(outs).mean(0) - dense).norm() / dense.norm()).item()
    assert err < 0.02
    assert err < 0.2 * sum(single) / len(single)


# --- measured density of fixed budgets ------------------------------------------------------


@pytest.mark.parametrize("masker", [
    OracleTopK(heavy_size=0.1), RandomProjectionTopK(heavy_size=0.1), Quest(heavy_size=0.1),
    DoubleSparsity(heavy_size=0.1, calibration="online"), RandomSampling(rate=0.1),
    OracleTopK(heavy_size=0.1, per_kv_head=True), Quest(heavy_size=0.1, per_kv_head=True),
    RandomSampling(rate=0.1, per_kv_head=True),
], ids=lambda m: type(m).__name__ + ("_per_kv_head" if getattr(m, "per_kv_head", False) else ""))
def test_density_within_one_percent(masker):
    method = SparseMethod.from_config({"name": "t", "maskers": {}})
    method.maskers = {"m": masker}
    method.num_layers = 1
    method.set_phase("decode")
    query, key, value = tensors(h=8, hk=2, q=1, kv=3000)
    method.attention(MODULE, query, key, value, None, 0.25)
    density = method.stats()["density"]["decode"][0]
    assert abs(density - 0.1) <= 0.001


# --- config validation ----------------------------------------------------------------------


def test_config_errors_name_the_full_key():
    base = {"name": "x", "maskers": {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK",
                                              "heavy_size": 1.5}}}
    with pytest.raises(ConfigError, match=r"^sparse\.maskers\.topk\.heavy_size: a fraction must be in \(0, 1\], got 1.5"):
        SparseMethod.from_config(base)
    bad = {"name": "x", "maskers": {"topk": {"_target_": "sa_bench.attention.maskers.OracleTopK",
                                             "heavy": 3}}}
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.topk\.heavy: unknown key"):
        SparseMethod.from_config(bad)
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.p\.top_p: expected a value in"):
        SparseMethod.from_config({"name": "x", "maskers": {"p": {
            "_target_": "sa_bench.attention.maskers.OracleTopP", "top_p": 0.0}}})
    with pytest.raises(ConfigError, match=r"sparse\.phase"):
        SparseMethod.from_config({"name": "x", "phase": "prefill", "maskers": {}})
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.h\.weights: hashattn weights file not found"):
        SparseMethod.from_config({"name": "x", "maskers": {"h": {
            "_target_": "sa_bench.attention.hashattn.HashAttention", "weights": "/nonexistent.st"}}})
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.z\._target_"):
        SparseMethod.from_config({"name": "x", "maskers": {"z": {"_target_": "os.path.join"}}})


# --- decode machinery: incremental caches, fast selection paths, blocks ----------------------


def test_quest_page_stats_incremental_equal_recomputed_after_appends_and_crop():
    from sa_bench.attention.maskers import PageStats

    def scratch(key, p):
        pages = [key[:, :, j:j + p] for j in range(0, key.shape[2], p)]
        return torch.stack([torch.cat([pg.amax(2), pg.amin(2)], -1) for pg in pages], 2)

    g = torch.Generator().manual_seed(1)
    key = torch.randn(1, 2, 37, 8, generator=g)
    stats = PageStats()
    torch.testing.assert_close(stats.pages(0, key, 37, 16), scratch(key, 16), rtol=0, atol=0)
    for _ in range(20):  # decode: one key per step, crossing page boundaries
        key = torch.cat([key, torch.randn(1, 2, 1, 8, generator=g)], 2)
        torch.testing.assert_close(stats.pages(0, key, 1, 16), scratch(key, 16), rtol=0, atol=0)
    stats.truncate(0, 40)  # DynamicCache.crop to 40 keys, then other keys appended
    key = torch.cat([key[:, :, :40], 10 + torch.randn(1, 2, 9, 8, generator=g)], 2)
    torch.testing.assert_close(stats.pages(0, key, 9, 16), scratch(key, 16), rtol=0, atol=0)
    view = torch.cat([key, key], 2)[:, :, :45]  # a strided view, as after crop
    stats.truncate(0, 45)
    torch.testing.assert_close(stats.pages(0, view, 0, 16), scratch(view, 16), rtol=0, atol=0)


def test_key_cache_rows_are_remade_for_other_features_and_keep_the_rows_before():
    """`KeyCache.rows` (written in place by `out=`): grown with the rows before `at` kept;
    remade when the batch, heads, feature shape, dtype or device differ."""
    from sa_bench.attention.selection import KeyCache

    cache = KeyCache()
    first = torch.randn(1, 2, 10, 4)
    cache.write(0, 0, first)
    buf = cache.buf[0]
    cache.rows(0, 10, 3, first).fill_(7.0)  # room left: the same buffer, written in place
    assert cache.buf[0] is buf and torch.equal(buf[:, :, :10], first) and bool((buf[:, :, 10:13] == 7).all())
    cache.rows(0, 13, 2000, first)  # grown: the rows before kept
    assert cache.buf[0].shape[2] >= 2013 and torch.equal(cache.buf[0][:, :, :13], buf[:, :, :13])
    for like in (torch.empty(2, 2, 0, 4), torch.empty(1, 3, 0, 4), torch.empty(1, 2, 0, 5),
                 torch.empty(1, 2, 0, 4, dtype=torch.float64)):
        rows = cache.rows(0, 0, 5, like)
        assert rows.shape == (*like.shape[:2], 5, *like.shape[3:]) and rows.dtype == like.dtype
        assert cache.buf[0].shape[:2] == like.shape[:2] and cache.buf[0].dtype == like.dtype


def test_quest_decode_steps_match_brute_force_with_partial_pages():
    query, key, _ = tensors(h=4, hk=2, q=1, kv=101, d=8)
    masker = Quest(heavy_size=24, page_size=8)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # the cache grows by one key per call
        key = torch.cat([key, torch.randn(1, 2, 1, 8, generator=g)], 2)
        kv = key.shape[2]
        _, sel = run([Sink(size=2), masker], query, key)
        _, prior_sel = run([Sink(size=2)], query, key)

        def score(bi, hi, i, key=key, kv=kv):
            k, qv = key[bi, hi // 2], query[bi, hi, i]
            return [torch.maximum(qv * k[j // 8 * 8:j // 8 * 8 + 8].min(0).values,
                                  qv * k[j // 8 * 8:j // 8 * 8 + 8].max(0).values).sum().item()
                    for j in range(kv)]

        check_topk(row_sets(sel), row_sets(prior_sel), score, lambda n: 24, kv, 1)


@pytest.mark.parametrize("uniform", [True, False])
def test_top_rows_with_a_static_bound_equals_topk(uniform):
    from sa_bench.attention.ops import top_rows

    scores = torch.randn(1, 4, 3, 2000, generator=torch.Generator().manual_seed(0))
    scores[0, 1, 2, :100] = float("-inf")
    k = torch.full((1, 1, 3), 300) if uniform else torch.tensor([[[300, 110, 299]]])
    idx, valid = top_rows(scores, k, 310)  # a bound above every k
    assert idx.shape[-1] == 310
    for hi in range(4):
        for i in range(3):
            got = set(idx[0, hi, i][valid[0, hi, i]].tolist())
            assert got == set(scores[0, hi, i].topk(int(k[0, 0, i])).indices.tolist())


def test_draw_candidates_is_uniform_over_the_candidates():
    from sa_bench.attention.masker import draw_candidates

    query, key, _ = tensors(h=2, hk=1, q=2, kv=600)
    counts = torch.zeros(2, 2, 600)
    reps, m = 400, 30
    for seed in range(reps):
        ctx, sel = run([Sink(size=4), Local(size=16)], query, key, seed=seed)
        idx, valid = draw_candidates(ctx, sel, torch.full((1, 2, 2), m), m)
        assert idx.shape[-1] > m  # the draw path (a few more draws than keys wanted)
        for hi in range(2):
            for i in range(2):
                keys = idx[0, hi, i][valid[0, hi, i]].tolist()
                assert len(keys) == len(set(keys)) == m
                counts[hi, i, keys] += 1
    for i in range(2):
        seen = causal_keys(600, 2, i) - set(range(4)) - set(range(600 - 2 + i - 15, 600 - 2 + i + 1))
        inside = sorted(seen)
        assert counts[:, i, [j for j in range(600) if j not in seen]].sum() == 0
        freq = counts[:, i, inside] / reps  # each candidate: m / R, binomial noise
        p = m / len(inside)
        assert abs(freq.mean().item() - p) < 1e-6
        assert (freq - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / reps)


def test_vattention_budget_is_the_one_sided_clt_bound_of_the_reference():
    masker = AdaptiveSampling(base_rate=0.02, epsilon=0.1, delta=0.05)
    z = 1.6448536269514722  # Phi^-1(0.95): one-sided, as sparse-attention-hub's norm.ppf(1 - delta)
    sigma = torch.tensor([0.5, 2.0, 1e-3, 0.05])
    denom = torch.tensor([1000.0, 50.0, 10.0, 40.0])
    n_rem = torch.tensor([5000, 5000, 5000, 100])
    want = [min(max(math.floor((z * s * r / (0.1 * dd)) ** 2), 1), r)
            for s, dd, r in zip(sigma.tolist(), denom.tolist(), n_rem.tolist(), strict=True)]
    assert masker.budget(sigma, denom, n_rem).tolist() == want
    assert want[0] == 1690  # (1.6449 * 25)^2 = 1690.96; two-sided (z = 1.96) would give 2400
    assert masker.base_size(torch.tensor([5000, 120, 1, 0])).tolist() == [100, 2, 1, 0]


@pytest.mark.parametrize("per_head", [False, True])  # sink + local alone are shared by a group
def test_sparse_attention_reads_a_cropped_cache_view_without_copying(per_head):
    from sa_bench.attention.gather import key_rows

    query, key, value = tensors(h=8, hk=2, q=1, kv=150)
    big_k = torch.cat([key, torch.randn_like(key)], 2)
    big_v = torch.cat([value, torch.randn_like(value)], 2)
    view_k, view_v = big_k[:, :, :150], big_v[:, :, :150]  # what DynamicCache.crop leaves
    rows, _, _ = key_rows(view_k)
    assert rows.data_ptr() == big_k.data_ptr()
    maskers = [Sink(size=4), Local(size=8)] + ([RandomProjectionTopK(heavy_size=5)] if per_head else [])
    ctx, sel = run(maskers, query, view_k)
    ctx_c, sel_c = run(maskers, query, key)
    assert sel.shared != per_head
    out = sparse_attention(ctx, view_v, sel, Workspace())
    torch.testing.assert_close(out, sparse_attention(ctx_c, value, sel_c, Workspace()))
    torch.testing.assert_close(out, selection_out(query, key, value, sel_c), atol=1e-5, rtol=1e-4)


def test_oracle_topp_large_flat_sets_match_sorting():
    query, key, _ = tensors(h=2, hk=1, q=1, kv=3000, d=16, seed=2)
    query = query * 0.3  # flat attention: the set is most of the keys
    _, sel = run([Sink(size=4), OracleTopP(top_p=0.9)], query, key)
    for hi in range(2):
        s = (key[0, 0] @ query[0, hi, 0]) / 4
        s[:4] = float("-inf")
        p = torch.softmax(s.double(), 0)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        want = set(order[before < 0.9].tolist()) | set(range(4))
        got = row_sets(sel)[0, hi, 0]
        assert len(got ^ want) <= 1  # float32 vs float64 mass at the cut
        assert len(got) > 1500


def test_row_blocks_respect_the_budget():
    from sa_bench.attention.driver import row_blocks

    mib = 2**20
    blocks = row_blocks(1, 32, 1000, 131072, 256 * mib)
    assert blocks[0] == (0, 7) and blocks[-1] == (994, 1000)
    assert [r0 for r0, _ in blocks] == list(range(0, 1000, 7))
    for b, h, q, kv, budget in [(1, 32, 1000, 131072, 256 * mib), (2, 8, 50, 3000, mib),
                                (1, 4, 3, 10, 10**9)]:
        blocks = row_blocks(b, h, q, kv, budget)
        assert blocks[0][0] == 0 and blocks[-1][1] == q
        assert all(r1 == n0 for (_, r1), (n0, _) in zip(blocks, blocks[1:], strict=False))
        for r0, r1 in blocks:
            assert (r1 - r0) * b * h * (kv + 1) * 8 <= budget
    assert row_blocks(1, 32, 5, 10**8, mib) == [(i, i + 1) for i in range(5)]  # >= one row


@pytest.mark.parametrize("masked", [False, True])
def test_question_in_blocks_equals_one_block(masked):
    query, key, value = tensors(h=8, hk=2, q=23, kv=200)
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 23, 200)
        mask[..., ~allowed_from_mask(None, 1, 23, 200, "cpu")[0, 0]] = torch.finfo(torch.float32).min
    outs = {}
    for budget in (10**9, 8 * 8 * 201 * 3):  # one block, blocks of 3 rows
        method = SparseMethod.from_config({"name": "t", "block_bytes": budget, "maskers": {}})
        method.maskers = {"sink": Sink(size=4), "local": Local(size=8),
                          "topk": OracleTopK(heavy_size=0.1), "quest": Quest(heavy_size=16, page_size=8)}
        method.num_layers = 1
        method.set_phase("question")
        out, _ = method.attention(MODULE, query, key, value, mask, 0.25)
        outs[budget] = (out, method.stats()["density"]["question"][0])
    (one, d_one), (blocked, d_blocked) = outs.values()
    torch.testing.assert_close(blocked, one)
    assert d_blocked == pytest.approx(d_one, abs=1e-5)


def test_block_bytes_is_validated():
    with pytest.raises(ConfigError, match=r"sparse\.block_bytes: expected a positive"):
        SparseMethod.from_config({"name": "x", "block_bytes": 0, "maskers": {}})


def test_perf_command_times_real_decoding_steps(capsys):
    from sa_bench.perf.attention import main

    main(["--keys", "300", "--steps", "2", "--methods", "streaming", "quest", "--heads", "4",
          "--kv-heads", "2", "--head-dim", "16", "--per-kv-head"])
    out = capsys.readouterr().out
    assert "# 303..305 keys" in out  # 300 + 3 keys, one appended per step
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"SDPA grouped (baseline)", "SDPA enable_gqa (reference)", "streaming", "quest",
            "quest/kv"} == set(rows) - {"method"}  # streaming has no per_kv_head masker
    assert "1.00x" in rows["SDPA grouped (baseline)"]
    ops = {name: int(row.split("|")[-4]) for name, row in rows.items() if name != "method"}
    # sink + local read slices of the cache: a few calls, as dense; quest's index lists many
    assert ops["SDPA grouped (baseline)"] < ops["streaming"] and 4 * ops["streaming"] < ops["quest"]
    launches = {name: int(row.split("|")[-3]) for name, row in rows.items() if name != "method"}
    syncs = {name: int(row.split("|")[-2]) for name, row in rows.items() if name != "method"}
    assert launches["streaming"] <= 4 and launches["quest"] <= 50 and syncs["quest"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_maskers_on_cuda_equal_cpu_and_the_perf_command_runs_in_bf16(capsys):
    from sa_bench.perf.attention import main

    query, key, value = tensors(h=8, hk=2, q=3, kv=500)
    for make in (lambda: [Sink(size=4), Local(size=8), OracleTopK(heavy_size=0.1)],
                 lambda: [Sink(size=4), Quest(heavy_size=0.1, page_size=8)],
                 lambda: [Local(size=4), OracleTopP(top_p=0.8)],
                 lambda: [Sink(size=4), Local(size=8), OracleTopK(heavy_size=0.1, per_kv_head=True)],
                 lambda: [Sink(size=4), Quest(heavy_size=0.1, page_size=8, per_kv_head=True)]):
        ctx, sel = run(make(), query, key)
        want = sparse_attention(ctx, value, sel, Workspace())
        q, k, v = (t.cuda() for t in (query, key, value))
        ctx = Context(q, k, 0.25, 0, allowed_from_mask(None, 1, 3, 500, q.device),
                      torch.Generator(device="cuda").manual_seed(0))
        sel = Selection.empty(1, 8, 3, q.device)
        for masker in make():
            sel = masker.select(ctx, sel)
        torch.testing.assert_close(sparse_attention(ctx, v, sel, Workspace()).cpu(), want,
                                   atol=1e-4, rtol=1e-3)
    main(["--device", "cuda", "--dtype", "bfloat16", "--keys", "4096", "--steps", "2", "--methods",
          "streaming", "oracle_topk", "quest", "random_sampling", "oracle_topp", "vattention",
          "--per-kv-head"])
    out = capsys.readouterr().out
    assert "| vattention |" in out and "| quest/kv |" in out


@pytest.mark.parametrize("loop_rows", [0, 256])
def test_scores_at_equals_the_exact_scores_of_the_gathered_keys(loop_rows):
    """One query row at a time (CPU decode) and in one batch: q.k * scaling of each index."""
    query, key, _ = tensors(b=2, h=4, hk=2, q=3, kv=50)
    ctx = context(query, key)
    ctx.costs = GatherCosts(row_loop_max=loop_rows)
    idx = torch.randint(0, 50, (2, 4, 3, 7), generator=torch.Generator().manual_seed(1))
    want = (query.unsqueeze(3) * key.repeat_interleave(2, 1)[:, :, None].expand(2, 4, 3, 50, 16)
            .gather(3, idx[..., None].expand(2, 4, 3, 7, 16))).sum(-1) * ctx.scaling
    torch.testing.assert_close(ctx.scores_at(idx), want)


def test_ordered_ints_sort_as_the_floats():
    from sa_bench.attention.ops import ordered_ints

    x = torch.cat([torch.tensor([float("-inf"), float("inf"), -0.0, 0.0, 1e-40, -1e-40]),
                   torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3])
    ints = ordered_ints(x)
    assert torch.equal(x[ints.argsort(stable=True)], x.sort(stable=True).values)
    assert ints[0] < ints[2] < ints[3] < ints[1]  # -inf < -0.0 < +0.0 < inf


# --- per_kv_head: one selection per kv head -------------------------------------------------


def selection_out(query, key, value, sel):
    """Brute force: softmax over the selected keys (weights exp(logw)) of q.k * scaling, v."""
    g = query.shape[1] // key.shape[1]
    kv = key.shape[2]
    bias = torch.full((*sel.idx.shape[:3], kv + 1), float("-inf")).scatter_(-1, sel.idx, sel.logw)
    s = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * query.shape[-1] ** -0.5
    return torch.softmax(s + bias[..., :kv], -1) @ value.repeat_interleave(g, 1)


def quest_page_scores(query, key, page):
    """Quest's page score of every key's page, brute force: [b, H, q, kv]."""
    b, hk, kv, d = key.shape
    g = query.shape[1] // hk
    out = torch.empty(b, query.shape[1], query.shape[2], kv)
    for j in range(kv):
        keys = key[:, :, j // page * page:(j // page + 1) * page].repeat_interleave(g, 1)
        lo, hi = keys.amin(2, keepdim=True), keys.amax(2, keepdim=True)  # [b, H, 1, d]
        out[..., j] = torch.maximum(query * lo, query * hi).sum(-1)
    return out


PER_KV_HEAD = {
    "oracle_topk": (lambda: OracleTopK(heavy_size=0.2, per_kv_head=True),
                    lambda masker, ctx, query, key: ctx.scores()),
    "random_projection": (lambda: RandomProjectionTopK(heavy_size=0.2, per_kv_head=True),
                          lambda masker, ctx, query, key: masker.score(ctx)),
    "double_sparsity": (lambda: DoubleSparsity(heavy_size=0.2, channels=4, label_bits=16,
                                               calibration="online", per_kv_head=True),
                        lambda masker, ctx, query, key: masker.score(ctx)),
    "quest": (lambda: Quest(heavy_size=24, page_size=8, per_kv_head=True),
              lambda masker, ctx, query, key: quest_page_scores(query, key, 8)),
}


@pytest.mark.parametrize("q", [1, 6])
@pytest.mark.parametrize("name", sorted(PER_KV_HEAD))
def test_per_kv_head_is_one_set_per_kv_head_by_the_groups_highest_score(name, q):
    make, score_of = PER_KV_HEAD[name]
    query, key, _ = tensors(h=8, hk=2, q=q, kv=120)
    prior = [Sink(size=3), Local(size=5)]
    _, prior_sel = run(prior, query, key)
    masker = make()
    ctx, sel = run([*prior, masker], query, key)
    assert prior_sel.shared and sel.shared
    sets = row_sets(sel)
    for (bi, hi, i), keys in sets.items():
        assert keys == sets[bi, hi // 4 * 4, i]  # the 4 query heads of a kv head share the set
    group = score_of(masker, ctx, query, key).unflatten(1, (2, 4)).amax(2)  # [b, Hk, q, kv]
    k_of = (lambda n: 24) if name == "quest" else (lambda n: round(0.2 * n))
    if name == "quest":  # pages: the best pages fill the budget (only the last may be cut)
        for (bi, hi, i), keys in sets.items():
            new = keys - row_sets(prior_sel)[bi, hi, i]
            assert len(new) == 24
            rest = causal_keys(120, q, i) - keys
            pages = {j // 8 for j in new}
            worst = min(group[bi, hi // 4, i, j].item() for j in new)
            assert all(group[bi, hi // 4, i, j].item() <= worst + 1e-5 for j in rest
                       if j // 8 not in pages)
    else:
        check_topk(sets, row_sets(prior_sel), lambda bi, hi, i: group[bi, hi // 4, i].tolist(),
                   k_of, 120, q)


@pytest.mark.parametrize("loop_rows", [0, 256])
@pytest.mark.parametrize("b,q", [(1, 1), (1, 2), (2, 1)])
def test_shared_selections_attend_as_brute_force(monkeypatch, loop_rows, b, q):
    """Each kv head's keys gathered once (one row at a time or in a batch) = the masked softmax,
    with the exact scores computed by a masker (oracle top-k) or gathered (Quest)."""
    import sa_bench.attention.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "shared_attention",
                        lambda *a, f=kernels.shared_attention: calls.append(1) or f(*a))
    query, key, value = tensors(b=b, h=8, hk=2, q=q, kv=300)
    for last in (OracleTopK(heavy_size=0.1, per_kv_head=True),
                 Quest(heavy_size=0.1, page_size=8, per_kv_head=True)):
        ctx, sel = run([Sink(size=4), Local(size=8), last], query, key)
        ctx.costs = GatherCosts(row_loop_max=loop_rows)
        calls.clear()
        out = sparse_attention(ctx, value, sel, Workspace())
        assert calls  # the shared path was taken
        torch.testing.assert_close(out, selection_out(query, key, value, sel), atol=1e-5, rtol=1e-4)


def test_per_kv_head_after_a_per_query_head_masker_is_refused():
    data = {"name": "x", "maskers": {
        "sample": {"_target_": "sa_bench.attention.maskers.RandomSampling", "rate": 0.1},
        "topk": {"_target_": "sa_bench.attention.maskers.OracleTopK", "per_kv_head": True}}}
    with pytest.raises(ConfigError, match=r"sparse.maskers.topk.per_kv_head: .*'sample'"):
        SparseMethod.from_config(data)
    data["maskers"] = {"sink": {"_target_": "sa_bench.attention.maskers.Sink"},
                       "topk": data["maskers"]["topk"]}
    assert SparseMethod.from_config(data).maskers["topk"].per_kv_head


def test_per_kv_head_sampling_is_one_uniform_sample_per_kv_head():
    """Shared by the group's query heads, m keys per row among the candidates, weight R / m."""
    query, key, _ = tensors(h=8, hk=2, q=3, kv=400)
    counts = torch.zeros(2, 3, 400)
    for seed in range(200):
        ctx, sel = run([Sink(size=4), Local(size=8), RandomSampling(rate=0.1, per_kv_head=True)],
                       query, key, seed=seed)
        assert sel.shared
        sets = row_sets(sel)
        for (bi, hi, i), keys in sets.items():
            assert keys == sets[bi, hi // 4 * 4, i]
            fixed = set(range(4)) | set(range(400 - 3 + i - 7, 400 - 3 + i + 1))
            drawn = keys - fixed
            assert len(drawn) == round(0.1 * (400 - 3 + i + 1)) and drawn <= causal_keys(400, 3, i)
            if hi % 4 == 0:
                counts[hi // 4, i, list(drawn)] += 1
            row = sel.idx[bi, hi, i]
            weights = sel.logw[bi, hi, i][(row >= 4) & (row < 400 - 3 + i - 7) & sel.valid[bi, hi, i]]
            n_cand = 400 - 3 + i + 1 - len(fixed)
            torch.testing.assert_close(weights, torch.full_like(weights, math.log(n_cand / len(drawn))))
    for hg in range(2):  # every candidate is drawn about equally often (~20 times)
        for i in range(3):
            cand = counts[hg, i, 4:400 - 3 + i - 7]
            assert cand.min() > 0.2 * cand.mean() and cand.max() < 2.5 * cand.mean()


@pytest.mark.parametrize("n", [3, 40])  # a sorted search for few selected keys, else a bitmap
def test_selection_contains_is_membership(n):
    g = torch.Generator().manual_seed(n)
    kv = 300
    idx = torch.stack([torch.randperm(kv, generator=g)[:n] for _ in range(6)]).view(1, 2, 3, n)
    valid = torch.rand(1, 2, 3, n, generator=g) > 0.2
    sel = Selection.empty(1, 2, 3, "cpu").add(idx, valid, 0.0, kv)
    cand = torch.randint(0, kv, (1, 1, 3, 50), generator=g)
    got = sel.contains(cand, kv)
    for hi in range(2):
        for i in range(3):
            chosen = set(idx[0, hi, i][valid[0, hi, i]].tolist())
            assert got[0, hi, i].tolist() == [c in chosen for c in cand[0, 0, i].tolist()]


@pytest.mark.parametrize("sizes,kv", [
    ((4, 64), 300), ((4, 64), 60), ((0.05, 0.1), 333), ((16, 0.25), 301), ((0, 8), 40),
    ((300, 8), 100), ((3, 0.5), 7),
])
def test_sink_and_local_decode_on_cache_slices_equals_the_index_path(sizes, kv):
    """One query row without a mask (decode): sink + local attend to slices of the cache on
    the dense kernel; output and density equal the general index-list path, with every
    selection (overlapping ranges, fractions, sizes past the key count)."""
    query, key, value = tensors(b=2, h=8, hk=2, kv=kv, d=32, seed=kv)
    sink, local = sizes

    def method():
        m = SparseMethod.from_config({"name": "s", "phase": "question", "maskers": {
            "sink": {"_target_": "sa_bench.attention.maskers.Sink", "size": sink},
            "local": {"_target_": "sa_bench.attention.maskers.Local", "size": local}}})
        m.set_phase("decode")
        return m

    spans, ranged = decode_spans(method().maskers.values(), 1, kv, None)
    assert spans and ranged == 2
    fast = method()
    out = fast.attention(MODULE, query, key, value, None, 32 ** -0.5)[0].transpose(1, 2)
    ctx, sel = run(list(method().maskers.values()), query, key)  # the maskers' own selection
    ref = sparse_attention(ctx, value, sel, Workspace())
    attended = {len(keys) for keys in row_sets(sel).values()}
    assert attended == {sum(b - a for a, b in spans)}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fast.stats()["density"]["decode"][0] == pytest.approx(attended.pop() / kv, abs=1e-6)


def test_decode_spans_only_for_range_maskers_one_row_and_no_mask():
    ranges = [Sink(size=4), Local(size=8)]
    assert decode_spans(ranges, 1, 100, None) == ([(0, 4), (92, 100)], 2)
    assert decode_spans(ranges, 1, 10, None) == ([(0, 10)], 2)  # overlapping: merged
    assert decode_spans(ranges, 2, 100, None) == ([], 0)  # several rows: each its own window
    assert decode_spans(ranges, 1, 100, torch.zeros(1, 1, 1, 100)) == ([], 0)  # padding
    top = OracleTopK(heavy_size=0.1)
    assert decode_spans([*ranges, top], 1, 100, None) == ([(0, 4), (92, 100)], 2)  # a prefix
    assert decode_spans([top, *ranges], 1, 100, None) == ([], 0)
    assert decode_spans([Sink(size=0), Local(size=0)], 1, 100, None) == ([], 2)  # nothing


@pytest.mark.parametrize("maskers", [
    lambda: [Sink(size=4), Local(size=16), OracleTopK(heavy_size=0.1)],
    lambda: [Sink(size=4), Local(size=16), OracleTopK(heavy_size=0.1, per_kv_head=True)],
    lambda: [Sink(size=4), Local(size=0.05), Quest(heavy_size=0.1, page_size=8)],
    lambda: [Sink(size=300), Local(size=16), OracleTopK(heavy_size=0.1)],  # ranges cover all
])
def test_range_prefix_as_spans_selects_what_the_maskers_select(maskers):
    """Decode: the leading sink / local become one selection of ranges; the keys every row
    attends to and the output equal those of every masker run through the index lists."""
    query, key, value = tensors(b=2, h=8, hk=2, kv=257, d=32, seed=3)
    ctx, ref_sel = run(maskers(), query, key)
    ref = sparse_attention(ctx, value, ref_sel, Workspace())
    out, density, scale = attend_blocks(maskers(), query, key, value, None, 32 ** -0.5, 0, None,
                                        Workspace(), 2**30)
    spans, ranged = decode_spans(maskers(), 1, 257, None)
    assert ranged == 2
    ctx = context(query, key)
    sel = Selection.of_spans(spans, 2, 8, 1, "cpu")
    for m in maskers()[2:]:
        sel = m.select(ctx, sel)
    assert row_sets(sel) == row_sets(ref_sel)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert float(density) * scale == pytest.approx(sum(map(len, row_sets(ref_sel).values())) / 257,
                                                    rel=1e-6)


@pytest.mark.parametrize("density", [0.0, 0.03, 0.1, 0.6, 1.0])
def test_compact_lists_each_rows_true_positions_in_order(density):
    """Both ways (nonzero for sparse masks on CPU, a running count for dense ones and on an
    accelerator's paths, with or without a cached arange of positions)."""
    from sa_bench.attention.ops import accelerator_paths

    g = torch.Generator().manual_seed(int(density * 100))
    mask = torch.rand(2, 3, 4, 200, generator=g) < density
    mask[0, 0, 0] = False  # an empty row
    with accelerator_paths():
        forced = compact(mask, 200, torch.arange(300))
    for idx, valid in (compact(mask, 200), forced):
        assert idx.shape == valid.shape == (2, 3, 4, int(mask.sum(-1).max()))
        for pos in itertools.product(range(2), range(3), range(4)):
            want = mask[pos].nonzero().flatten().tolist()
            assert idx[pos][valid[pos]].tolist() == want
            assert (idx[pos][~valid[pos]] == 200).all()


def test_oracle_topp_dense_part_as_bias_equals_index_lists():
    """A flat row keeps most keys as a dense mask: attention with it as a bias equals
    attention over the same keys as index lists; the density counts both parts."""
    query, key, value = tensors(b=1, h=8, hk=2, q=1, kv=2000, d=16, seed=4)
    query = query * 0.3
    ctx, sel = run([Sink(size=4), Local(size=8), OracleTopP(top_p=0.9)], query, key)
    assert sel.dense is not None and int(sel.dense.sum()) > 8 * 1000
    assert not (sel.dense.gather(-1, sel.idx.clamp(max=1999)) & sel.valid).any()  # disjoint
    indexed = sel.indexed()
    assert torch.equal(sel.count(), indexed.valid.sum(-1))
    out = sparse_attention(ctx, value, sel, Workspace())
    torch.testing.assert_close(out, sparse_attention(ctx, value, indexed, Workspace()))
    torch.testing.assert_close(out, selection_out(query, key, value, indexed), atol=1e-5, rtol=1e-4)


def test_oracle_topp_dense_row_without_keys_attends_to_nothing():
    """A row that may see no key selects none: its output is 0 on the bias path too, as on the
    index path (a dense mask of -max everywhere would otherwise average all values)."""
    query, key, value = tensors(b=1, h=8, hk=2, q=2, kv=2000, d=16, seed=6)
    mask = torch.zeros(1, 1, 2, 2000)
    mask[0, 0, 0] = torch.finfo(torch.float32).min  # row 0 sees nothing
    ctx = context(query * 0.3, key, mask)
    sel = OracleTopP(top_p=0.9).select(ctx, Selection.empty(1, 8, 2, "cpu"))
    assert sel.dense is not None and int(sel.count()[0, :, 0].sum()) == 0
    out = sparse_attention(ctx, value, sel, Workspace())
    assert (out[:, :, 0] == 0).all() and (out[:, :, 1] != 0).any()
    torch.testing.assert_close(out, sparse_attention(ctx, value, sel.indexed(), Workspace()))


def _topp_float_bincount(masker, ctx, sel):
    """The earlier OracleTopP.select: bin masses by a float-weighted bincount (float atomics on
    CUDA: not reproducible run to run). The reference the integer version must match."""
    from sa_bench.attention.ops import compact as _compact
    kv, nb = ctx.kv, 4096
    probs = torch.softmax(ctx.without(ctx.scores(), sel), -1).nan_to_num_(0.0)
    rows = probs.shape[:3]
    first_bin = torch.arange(rows.numel(), dtype=torch.int32).view(*rows, 1) * nb
    bins = torch.bitwise_right_shift(probs.view(torch.int32), 18).add_(first_bin)
    mass = torch.bincount(bins.view(-1), probs.view(-1), rows.numel() * nb).view(*rows, nb)
    above = mass.flip(-1).cumsum(-1).flip(-1)
    edge = ((above >= masker.top_p).sum(-1, keepdim=True) - 1).clamp_(min=0)
    before_edge = (above - mass).gather(-1, edge)
    edge = edge.int() + first_bin
    idx, ok = _compact(bins == edge, kv)
    vals = probs.gather(-1, idx.clamp(max=kv - 1)).masked_fill_(~ok, -1.0)
    vals, order = vals.sort(-1, descending=True)
    before = before_edge + vals.cumsum(-1) - vals
    ok = (before < masker.top_p) & (vals > 0)
    out = sel.add(idx.gather(-1, order), ok, 0.0, kv)
    return Selection(out.idx, out.logw, False, bins > edge)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_oracle_topp_integer_bin_mass_selects_as_before(monkeypatch, top_p, temperature):
    """Issue 21 item 10: the bins' masses are summed in integers (deterministic on any device,
    no float `bincount`), and the selection is the one the float sums gave."""
    query, key, _ = tensors(b=2, h=8, hk=2, q=3, kv=3000, d=16, seed=int(top_p * 100))
    masker = OracleTopP(top_p=top_p)
    ctx = context(query * temperature, key)
    sel0 = Sink(size=4).select(ctx, Selection.empty(2, 8, 3, "cpu"))
    want = row_sets(_topp_float_bincount(masker, ctx, sel0))

    def no_bincount(*a, **k):
        raise AssertionError("float bincount used")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    got = row_sets(masker.select(ctx, sel0))
    assert got == want


@pytest.mark.parametrize("spans", [[(0, 4), (193, 257)], [(0, 4)], [(10, 20), (30, 40)],
                                   [(0, 257)], [(250, 257)]])
def test_unselected_by_span_bounds_is_the_set_difference(spans):
    """A selection of ranges answers 'a key < kv not selected yet' by its gaps' bounds; the
    same entries without the ranges by the search - both the set difference, for candidates
    past kv too."""
    kv = 257
    sel = Selection.of_spans(spans, 2, 8, 1, "cpu")
    idx = torch.randint(0, kv + 20, (2, 1, 1, 300), generator=torch.Generator().manual_seed(0))
    taken = {j for a, b in spans for j in range(a, b)}
    want = torch.tensor([[j < kv and j not in taken for j in row] for row in idx.view(2, -1).tolist()])
    want = want.view(2, 1, 1, 300).expand(2, 8, 1, 300)
    assert torch.equal(sel.unselected(idx, kv), want)
    assert torch.equal(Selection(sel.idx, sel.logw).unselected(idx, kv), want)
