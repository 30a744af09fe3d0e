"""PQCache and SOCKET against brute-force references of their approximate scores."""

from __future__ import annotations

import itertools
import json
import math
import os
import types

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from sa_bench.attention.gather import Workspace  # noqa: E402
from sa_bench.attention.kernels import sparse_attention  # noqa: E402
from sa_bench.attention.maskers import Local, Sink  # noqa: E402
from sa_bench.attention.method import SparseMethod  # noqa: E402
from sa_bench.attention.ops import allowed_from_mask  # noqa: E402
from sa_bench.attention.pqcache import PQCache, kmeans  # noqa: E402
from sa_bench.attention.selection import Context, Selection  # noqa: E402
from sa_bench.attention.socket_topk import Socket  # noqa: E402
from sa_bench.config import ConfigError  # noqa: E402
from tests.conftest import FIXTURES, run_sa_bench  # noqa: E402
from tests.unit.attention.test_attention_maskers import check_topk, dense_out, row_sets, tensors  # noqa: E402


def run(maskers, query, key, value, layer=0):
    b, h, q, _ = query.shape
    ctx = Context(query, key, query.shape[-1] ** -0.5, layer,
                  allowed_from_mask(None, b, q, key.shape[2], "cpu"), value=value)
    sel = Selection.empty(b, h, q, "cpu")
    for m in maskers:
        sel = m.select(ctx, sel)
    return ctx, sel


def group_max(score, g):
    """score(bi, hi, i) -> per query head the best score of its kv head's query heads."""
    def best(bi, hi, i):
        rows = [score(bi, hk, i) for hk in range((hi // g) * g, (hi // g + 1) * g)]
        return [max(col) for col in zip(*rows, strict=True)]
    return best


# --- PQCache ------------------------------------------------------------------------------------


def pq_reference(query, key, centroids, offset):
    """Brute force: each key's nearest centroid per sub-space by explicit distances, the key
    rebuilt from them, scored by q . k_hat; keys before `offset` score -inf."""
    _, hk, m, c, s = centroids.shape
    g = query.shape[1] // hk

    def score(bi, hi, i):
        out = []
        for j in range(key.shape[2]):
            if j < offset:
                out.append(-math.inf)
                continue
            parts = []
            for sub in range(m):
                x = key[bi, hi // g, j, sub * s:(sub + 1) * s]
                cs = centroids[bi, hi // g, sub]
                parts.append(cs[((cs - x) ** 2).sum(-1).argmin()])
            out.append((query[bi, hi, i] @ torch.cat(parts)).item())
        return out
    return score


@pytest.mark.parametrize("q,per_kv_head", [(1, False), (3, False), (1, True)])
def test_pqcache_selects_the_top_k_of_the_quantized_scores(q, per_kv_head):
    query, key, value = tensors(h=4, hk=2, q=q, kv=200, d=16)
    masker = PQCache(heavy_size=20, pq_group_factor=4, pq_bits=3, init_offset=4, per_kv_head=per_kv_head)
    prior = [Sink(size=4), Local(size=8)]
    _, prior_sel = run(prior, query, key, value)
    _, sel = run([*prior, masker], query, key, value)
    book = masker._books[0]
    assert book.fitted == 200 - q and book.centroids.shape == (1, 2, 4, 8, 4)  # fitted on the context
    score = pq_reference(query, key, book.centroids, 4)
    check_topk(row_sets(sel), row_sets(prior_sel), group_max(score, 2) if per_kv_head else score,
               lambda n: 20, 200, q)


def test_pqcache_codebook_is_a_kmeans_fixed_point_of_the_context_keys():
    query, key, value = tensors(h=2, hk=1, q=1, kv=300, d=8)
    masker = PQCache(heavy_size=10, pq_group_factor=2, pq_bits=3, kmeans_iter=200, init_offset=5)
    run([masker], query, key, value)
    cents = masker._books[0].centroids[0, 0]  # [m, C, s]
    for sub in range(2):
        x = key[0, 0, 5:299, sub * 4:(sub + 1) * 4]  # the context after init_offset, not the new key
        nearest = torch.cdist(x, cents[sub]).argmin(-1)
        for c in range(8):
            assert (nearest == c).any()
            torch.testing.assert_close(cents[sub, c], x[nearest == c].mean(0))


def test_kmeans_is_lloyd_from_the_given_centroids():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 60, 2, generator=g)
    init = x[:, :4].clone()
    init[1, 3] = 100.0  # a centroid no row is nearest to: it stays
    want = init.clone()
    for _ in range(2):  # two rounds by hand, explicit distances
        new = want.clone()
        for grp in range(3):
            near = ((x[grp, :, None] - want[grp, None]) ** 2).sum(-1).argmin(-1)
            for c in range(4):
                if (near == c).any():
                    new[grp, c] = x[grp, near == c].mean(0)
        want = new
    torch.testing.assert_close(kmeans(x, init, 2), want)
    assert kmeans(x, init, 2)[1, 3].tolist() == [100.0, 100.0]


def test_pqcache_codes_appended_keys_without_refitting_and_refits_for_a_new_context():
    query, key, value = tensors(h=4, hk=2, q=1, kv=150, d=16)
    masker = PQCache(heavy_size=12, pq_group_factor=2, pq_bits=4, init_offset=2)
    g = torch.Generator().manual_seed(7)
    run([masker], query, key, value)
    book = masker._books[0]
    for _ in range(4):  # decode: one key per call, far from the context's keys
        key = torch.cat([key, 5 * torch.randn(1, 2, 1, 16, generator=g)], 2)
        value = torch.cat([value, torch.randn(1, 2, 1, 16, generator=g)], 2)
        _, sel = run([masker], query, key, value)
        assert masker._books[0] is book
        empty = {r: set() for r in row_sets(sel)}
        check_topk(row_sets(sel), empty, pq_reference(query, key, book.centroids, 2), lambda n: 12,
                   key.shape[2], 1)
    # the next question on the same context (cache cropped to it): the same codebook
    run([masker], query, torch.cat([key[:, :, :149], key[:, :, -1:]], 2), value[:, :, :150])
    assert masker._books[0] is book
    # a new context (its dense prefill truncates the key caches, as SparseMethod.attention does)
    masker.truncate(0, 0)
    other = torch.randn(1, 2, 150, 16, generator=g)
    _, sel = run([masker], query, other, value[:, :, :150])
    assert masker._books[0] is not book and masker._books[0].fitted == 149
    empty = {r: set() for r in row_sets(sel)}
    check_topk(row_sets(sel), empty, pq_reference(query, other, masker._books[0].centroids, 2),
               lambda n: 12, 150, 1)


# --- SOCKET -------------------------------------------------------------------------------------


def socket_reference(query, key, value, planes, tau):
    """Brute force: each key's bucket per table from its sign bits (first plane most
    significant), the query's softmax over the corners of {-1, +1}^K in that order, score =
    summed probability of the key's buckets times |v|."""
    L, K, d = planes.shape
    g = query.shape[1] // key.shape[1]
    cube = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=K)))  # [2^K, K]

    def score(bi, hi, i):
        qv = query[bi, hi, i]
        out = []
        probs = [torch.softmax(cube @ torch.tanh(planes[t] @ qv) / math.sqrt(d) / tau, 0) for t in range(L)]
        for j in range(key.shape[2]):
            k = key[bi, hi // g, j]
            mass = sum(probs[t][int("".join("1" if (w @ k) >= 0 else "0" for w in planes[t]), 2)]
                       for t in range(L))
            out.append((mass * value[bi, hi // g, j].norm()).item())
        return out
    return score


@pytest.mark.parametrize("q,per_kv_head", [(1, False), (4, False), (1, True)])
def test_socket_selects_the_top_k_of_soft_collisions_times_value_norm(q, per_kv_head):
    query, key, value = tensors(h=4, hk=2, q=q, kv=180, d=16)
    masker = Socket(heavy_size=25, lsh_bits=3, lsh_tables=3, tau=0.5, seed=1, per_kv_head=per_kv_head)
    prior = [Sink(size=4), Local(size=8)]
    _, prior_sel = run(prior, query, key, value)
    _, sel = run([*prior, masker], query, key, value)
    planes = torch.randn((3, 3, 16), generator=torch.Generator().manual_seed(1))
    score = socket_reference(query, key, value, planes, 0.5)
    check_topk(row_sets(sel), row_sets(prior_sel), group_max(score, 2) if per_kv_head else score,
               lambda n: 25, 180, q)


def test_socket_hashes_appended_keys_and_values_incrementally():
    query, key, value = tensors(h=2, hk=1, q=1, kv=100, d=8)
    masker = Socket(heavy_size=10)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        key = torch.cat([key, torch.randn(1, 1, 1, 8, generator=g)], 2)
        value = torch.cat([value, 10 * torch.randn(1, 1, 1, 8, generator=g)], 2)  # large norms
        ctx, sel = run([masker], query, key, value)
        planes = masker.planes(8, "cpu")
        empty = {r: set() for r in row_sets(sel)}
        check_topk(row_sets(sel), empty, socket_reference(query, key, value, planes, 0.3),
                   lambda n: 10, key.shape[2], 1)
        assert masker._codes.length[0] == masker._norms.length[0] == key.shape[2]


# --- both ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("maskers", [
    [Sink(size=4), PQCache(heavy_size=1.0, pq_group_factor=2, pq_bits=3, init_offset=4)],
    [Local(size=3), Socket(heavy_size=1.0, lsh_bits=3)],
    [Sink(size=4), PQCache(heavy_size=1.0, pq_bits=3, init_offset=4, per_kv_head=True)],
    [Local(size=3), Socket(heavy_size=1.0, per_kv_head=True)],
], ids=["pqcache", "socket", "pqcache_kv", "socket_kv"])
@pytest.mark.parametrize("q", [1, 9])
def test_full_budget_equals_dense(maskers, q):
    for m in maskers:
        m.reset()
    query, key, value = tensors(h=8, hk=2, q=q, kv=120)
    ctx, sel = run(maskers, query, key, value)
    out = sparse_attention(ctx, value, sel, Workspace())
    torch.testing.assert_close(out, dense_out(query, key, value), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masker", [PQCache(heavy_size=0.1, init_offset=0), Socket(heavy_size=0.1)],
                         ids=["pqcache", "socket"])
def test_density_of_a_method_call(masker):
    """Through SparseMethod.attention (values reach the masker), in question blocks too."""
    for budget in (10**9, 8 * 8 * 3001 * 2):  # one block; blocks of 2 query rows
        method = SparseMethod.from_config({"name": "t", "block_bytes": budget, "maskers": {}})
        method.maskers = {"m": masker}
        method.num_layers = 1
        method.set_phase("question")
        masker.reset()
        query, key, value = tensors(h=8, hk=2, q=5, kv=3000)
        method.attention(types.SimpleNamespace(layer_idx=0, training=False), query, key, value, None, 0.25)
        assert abs(method.stats()["density"]["question"][0] - 0.1) <= 0.001


@pytest.mark.parametrize("target,values,message", [
    ("pqcache.PQCache", {"pq_bits": 0}, r"sparse\.maskers\.m\.pq_bits: expected a value >= 1"),
    ("pqcache.PQCache", {"pq_group_factor": 0}, r"sparse\.maskers\.m\.pq_group_factor"),
    ("pqcache.PQCache", {"init_offset": -1}, r"sparse\.maskers\.m\.init_offset"),
    ("socket_topk.Socket", {"tau": 0.0}, r"sparse\.maskers\.m\.tau: expected a value > 0"),
    ("socket_topk.Socket", {"lsh_bits": 16}, r"sparse\.maskers\.m\.lsh_bits"),
])
def test_bad_values_name_their_key(target, values, message):
    with pytest.raises(ConfigError, match=message):
        SparseMethod.from_config({"name": "x", "maskers": {"m": {
            "_target_": f"sa_bench.attention.{target}", **values}}})


def test_pq_group_factor_must_divide_the_head_dimension():
    config = types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=12)
    with pytest.raises(ConfigError, match=r"^sparse\.maskers\.pq\.pq_group_factor: 5 does not divide"):
        PQCache(pq_group_factor=5).prepare(config, "sparse.maskers.pq")
    PQCache(pq_group_factor=4).prepare(config, "sparse.maskers.pq")


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
@pytest.mark.parametrize("method", ["pqcache", "socket"])
def test_end_to_end_on_the_embedded_model(tmp_path, method):
    out = tmp_path / "out"
    run_sa_bench(f"sparse={method}", "benchmark.n_samples=2", "benchmark.subsets=[1k]", root=out,
                 check=True)
    (stats,) = out.rglob("stats.json")
    (metrics,) = out.rglob("metrics.json")
    density = json.loads(stats.read_text())["attention"]["density"]
    # sink 128 + local 128 + 10% of ~1k keys: about a third, in every layer and both phases
    assert all(0.25 < d < 0.45 for phase in ("question", "decode") for d in density[phase])
    assert json.loads(metrics.read_text())["n"] == 2


def test_perf_command_times_both(capsys):
    from sa_bench.perf.attention import main

    main(["--keys", "300", "--steps", "2", "--methods", "pqcache", "socket", "--heads", "4",
          "--kv-heads", "2", "--head-dim", "16", "--per-kv-head"])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert {"pqcache", "socket", "pqcache/kv", "socket/kv"} <= set(rows)


# --- parity with sparse-attention-hub ---------------------------------------------------------

HUB = FIXTURES / "hub" / "pq_socket.safetensors"
"""Inputs and the hub's selections, written by running its maskers (see fixtures/hub/README.md)."""


def hub_fixture() -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(HUB), "pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    assert meta["commit"].startswith("f5abf91")
    return tensors, json.loads(meta["cases"])


def dense_sets(mask):
    """{(b, h, i): set of selected keys} of a bool [b, H, q, kv] mask."""
    return {(bi, hi, i): set(mask[bi, hi, i].nonzero().flatten().tolist())
            for bi in range(mask.shape[0]) for hi in range(mask.shape[1]) for i in range(mask.shape[2])}


def prior_maskers(sizes):
    return [Sink(size=sizes[0]), Local(size=sizes[1])] if sizes else []


@pytest.mark.parametrize("case", ["socket_default", "socket_k3_l5", "socket_k6_l2_sink_local",
                                  "socket_embedded"])
def test_socket_selects_as_the_hub(case):
    tensors, cases = hub_fixture()
    spec = cases[case]
    src, cfg = spec["input"], spec["config"]
    query, key, value = (tensors[f"{src}.{n}"] for n in ("query", "key", "value"))
    masker = Socket(heavy_size=cfg["heavy_size"], lsh_bits=cfg.get("K", 4), lsh_tables=cfg.get("L", 1),
                    tau=cfg.get("tau", 0.3))  # the default seed: the hub's planes
    _, prior_sel = run(prior_maskers(spec["sink_local"]), query, key, value)
    _, sel = run([*prior_maskers(spec["sink_local"]), masker], query, key, value)
    ours, hub, prior = row_sets(sel), dense_sets(tensors[f"{case}.selected"]), row_sets(prior_sel)
    if not spec["sink_local"]:
        assert ours == hub
        return
    # the hub ranks the sink and local keys too (class docstring): its new keys are the best
    # of ours, fewer by the keys its top-k spent on sink and local
    for row, chosen in ours.items():
        assert prior[row] <= hub[row] <= chosen
        assert len(chosen) == len(prior[row]) + cfg["heavy_size"] > len(hub[row])


@pytest.mark.parametrize("case", ["pq_alone", "pq_sink_local", "pq_embedded"])
def test_pqcache_fits_codes_and_selects_as_the_hub(case):
    tensors, cases = hub_fixture()
    spec = cases[case]
    src, cfg = spec["input"], spec["config"]
    query, key, value = (tensors[f"{src}.{n}"] for n in ("query", "key", "value"))
    off, centroids, codes = cfg["init_offset"], tensors[f"{case}.centroids"], tensors[f"{case}.codes"]
    masker = PQCache(heavy_size=cfg["heavy_size"], pq_group_factor=cfg["pq_group_factor"],
                     pq_bits=cfg["pq_bits"], kmeans_iter=cfg["kmeans_iter"], init_offset=off)
    # k-means from the hub's initial centroids (replayed draws of its global generator) on the
    # keys it clustered gives its centroids; its codes are the nearest centroids of the round
    # before the last (the last round's assignment), ours the nearest final ones (docstring)
    x = masker._split(key[:, :, off:])
    init = x.gather(1, tensors[f"{case}.init_idx"].unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    iters = cfg["kmeans_iter"]
    torch.testing.assert_close(kmeans(x, init, iters).view(centroids.shape), centroids)
    before_last = kmeans(x, init, iters - 1).view(centroids.shape)
    hub_codes = codes.transpose(1, 2)  # [b, Hk, n, m]
    assert torch.equal(masker.encode(key[:, :, off:], before_last).long(), hub_codes)
    assert not torch.equal(masker.encode(key[:, :, off:], centroids).long(), hub_codes)
    # with its codebook and codes, the same selections, then over three decode steps (keys
    # appended are coded by the nearest centroid, as the hub)
    masker.fit = lambda keys, layer: centroids
    encode, kv = masker.encode, key.shape[2]
    masker.encode = lambda keys, c: (torch.cat([encode(keys[:, :, :off], c), hub_codes.to(torch.int16)], 2)
                                     if keys.shape[2] == kv else encode(keys, c))
    pre, g = prior_maskers(spec["sink_local"]), query.shape[1] // key.shape[1]
    for step in range(-1, 3):
        if step >= 0:
            key = torch.cat([key, tensors[f"{case}.steps"][step]], 2)
            value = torch.cat([value, torch.zeros(1, 2, 1, key.shape[-1])], 2)
        _, sel = run([*pre, masker], query, key, value)
        name = f"{case}.selected" if step < 0 else f"{case}.step{step}.selected"
        hub, cached = dense_sets(tensors[name]), masker._codes.buf[0]
        for (bi, hi, i), chosen in row_sets(sel).items():
            # keys of equal codes tie exactly (topk breaks ties its own way): a key only one
            # side chose has the codes of a key only the other side chose
            codes_of = [sorted(tuple(cached[bi, hi // g, j].tolist()) for j in keys)
                        for keys in (chosen - hub[bi, hi, i], hub[bi, hi, i] - chosen)]
            assert codes_of[0] == codes_of[1]
    n = tensors[f"{case}.step_codes"].shape[1]
    assert torch.equal(masker._codes.buf[0][:, :, key.shape[2] - n:key.shape[2]].long(),
                       tensors[f"{case}.step_codes"].transpose(1, 2))
