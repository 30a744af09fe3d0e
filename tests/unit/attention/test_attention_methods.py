"""HashAttention, random-projection top-k, Double Sparsity and MagicPIG against brute-force
references; the published HashAttention weight layouts; files shipped for the embedded model;
refusal (before any job) of a model without fitted files."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from torch import nn  # noqa: E402

from sa_bench.attention.double_sparsity import DoubleSparsity, kv_head_channels, pseudo_quantize  # noqa: E402
from sa_bench.attention.hashattn import (  # noqa: E402
    HashAttention,
    HashWeights,
    RandomProjectionTopK,
    differing_bits,
    pack_signs,
    signature_scores,
)
from sa_bench.attention.magicpig import MagicPig, inclusion_probability  # noqa: E402
from sa_bench.attention.method import SparseMethod  # noqa: E402
from sa_bench.attention.ops import accelerator_paths, allowed_from_mask  # noqa: E402
from sa_bench.attention.selection import Context, KeyCache, Selection  # noqa: E402
from sa_bench.config import ConfigError  # noqa: E402
from sa_bench.models.loading import embedded_dir  # noqa: E402
from tests.conftest import run_sa_bench  # noqa: E402

EMBEDDED = "embedded:tiny-retrieval"


def context(query, key, layer=0):
    b, _, q, _ = query.shape
    return Context(query, key, query.shape[-1] ** -0.5, layer, allowed_from_mask(None, b, q, key.shape[2], "cpu"))


def select(masker, query, key):
    ctx = context(query, key)
    return masker.select(ctx, Selection.empty(query.shape[0], query.shape[1], query.shape[2], "cpu"))


def assert_topk(sel, scores, k, tol=1e-5):
    """Each row holds k keys, none scoring below a key left out by more than `tol` (ties, and
    near-ties within the precision of the masker's arithmetic, may go either way)."""
    b, h, q, kv = scores.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(q):
                n = kv - q + i + 1  # causal keys of the row
                chosen = sel.idx[bi, hi, i][sel.valid[bi, hi, i]].tolist()
                assert len(chosen) == len(set(chosen)) == min(k, n)
                rest = sorted(set(range(n)) - set(chosen))
                s = scores[bi, hi, i]
                if rest:
                    assert s[chosen].min() >= s[rest].max() - tol


def signs(x):
    return torch.where(x >= 0, 1.0, -1.0)


# --- bit-packed signatures --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 5, 31, 32, 33, 64, 100])
def test_packed_signatures_are_the_signs_they_encode(bits):
    x = torch.randn(2, 3, 7, bits)
    packed = pack_signs(x)
    assert packed.dtype == torch.int32 and packed.shape[-1] == -(-bits // 32)
    unpacked = torch.stack([(packed[..., i // 32] >> (i % 32)) & 1 for i in range(bits)], -1)
    assert torch.equal(unpacked.bool(), x >= 0)
    y = torch.randn(2, 3, 40, bits)
    want = signs(x) @ signs(y).transpose(-1, -2)
    assert torch.equal(signature_scores(packed, pack_signs(y), bits), want)
    with accelerator_paths():  # byte lookups of the xor: agreement table, popcount table
        assert torch.equal(signature_scores(packed, pack_signs(y), bits), want)
        diff = differing_bits(packed, pack_signs(y))
    assert diff.dtype == torch.int32 and torch.equal(bits - 2 * diff, want.int())


def test_random_projection_topk_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 8, 3, 16, generator=g), torch.randn(1, 2, 150, 16, generator=g)
    masker = RandomProjectionTopK(heavy_size=20, bits=24, seed=3)
    sel = select(masker, query, key)
    r = masker._proj[0]  # [Hk, d, bits]
    scores = torch.stack([signs(query[0, h] @ r[h // 4]) @ signs(key[0, h // 4] @ r[h // 4]).T
                          for h in range(8)])[None]
    assert_topk(sel, scores, 20)


# --- HashAttention weights in the published layouts -------------------------------------------


def usa_modules(heads, d, hidden, bits, seed=0):
    """Per query head, HashAttention-1.0's nn.Sequential(Linear, SiLU, Linear, SiLU, Linear)."""
    torch.manual_seed(seed)

    def mlp():
        return nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, bits))

    return {"q": nn.ModuleList([mlp() for _ in range(heads)]),
            "k": nn.ModuleList([mlp() for _ in range(heads)])}


def usa_state_dict(layers):
    """The USA checkpoint's keys: {layer}.learning_to_hash_transformation_{q,k}.{head}.{i}.*"""
    state = {}
    for lay, mods in enumerate(layers):
        for side, ml in mods.items():
            for name, t in ml.state_dict().items():
                state[f"{lay}.learning_to_hash_transformation_{side}.{name}"] = t
    return state


def hat_weights(layers):
    """sparse-attention-hub's convert_usa_weights_to_hash_attention layout (weights [H, in, out])."""
    out = {}
    for lay, mods in enumerate(layers):
        entry = {}
        for side, name in (("q", "query"), ("k", "key")):
            linears = [[m[i] for m in mods[side]] for i in (0, 2, 4)]
            entry[f"{name}_matrix"] = [torch.stack([lin.weight.detach().t() for lin in ls]) for ls in linears]
            entry[f"{name}_bias"] = [torch.stack([lin.bias.detach() for lin in ls]) for ls in linears]
        out[lay] = entry
    return out


@pytest.mark.parametrize("layout", ["usa", "hub", "own"])
def test_published_layouts_load_and_select_as_the_modules(tmp_path, layout):
    heads, kv_heads, d, bits = 4, 2, 16, 12
    layers = [usa_modules(heads, d, 10, bits, seed=s) for s in range(2)]
    if layout == "usa":
        path = tmp_path / "patch.pt"
        torch.save(usa_state_dict(layers), path)
    else:
        path = tmp_path / "w.hat_weights.pkl"
        with open(path, "wb") as f:
            pickle.dump(hat_weights(layers), f)
        if layout == "own":
            own = tmp_path / "w.safetensors"
            HashWeights.load(path, "k").save(own)
            path = own
    w = HashWeights.load(path, "k")
    w.check(2, heads, kv_heads, d, "k")
    assert (w.bits, w.hash_heads, len(w.layers[1]["key"])) == (bits, heads, 3)

    g = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, heads, 2, d, generator=g), torch.randn(1, kv_heads, 90, d, generator=g)
    masker = HashAttention(heavy_size=15, weights=str(path))
    cfg = {"num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": d}
    masker.prepare(type("Cfg", (), cfg)(), "sparse.maskers.hash")
    ctx = context(query, key, layer=1)
    sel = masker.select(ctx, Selection.empty(1, heads, 2, "cpu"))
    with torch.no_grad():  # per query head h: sign(f_h(q)) . sign(g_h(k)), keys of h's kv head
        scores = torch.stack([signs(layers[1]["q"][h](query[0, h])) @ signs(layers[1]["k"][h](key[0, h // 2])).T
                              for h in range(heads)])[None]
    assert_topk(sel, scores, 15)
    assert masker.notes() == [f"hashattn: learned signatures from {path} ({bits} bits, {heads} hash heads)"]


@pytest.mark.parametrize("hash_heads", [4, 2])
def test_hashattn_one_pass_of_new_keys_and_queries_gives_the_separate_signatures(hash_heads):
    """Decode hashes the new key and the query rows in one pass of the key and query MLPs as
    one of twice the heads (cached per layer, device and dtype): the signatures equal those of
    a pass per side, as the dtype and the cell (the context) change; kv-head weights (rows
    that differ per head) hash a side at a time."""
    heads, kv_heads, d = 4, 2, 16
    masker = HashAttention.__new__(HashAttention)
    masker._w, masker._placed = HashWeights.init(1, hash_heads, d, bits=40, hidden=(8,), seed=3), {}
    masker._sigs = KeyCache()
    g = torch.Generator().manual_seed(5)
    for dtype, kv in ((torch.float32, 50), (torch.float64, 50), (torch.float32, 33)):
        masker.reset()  # a new context
        key = torch.randn(1, kv_heads, kv, d, generator=g).to(dtype)
        for step in range(3):
            if step:
                key = torch.cat([key, torch.randn(1, kv_heads, 1, d, generator=g).to(dtype)], 2)
            ctx = context(torch.randn(1, heads, 1, d, generator=g).to(dtype), key)
            joint = masker._joint_signs(ctx, key[:, :, -1:])
            assert (joint is None) == (hash_heads == kv_heads)
            qs, ks = masker._signatures(ctx)
            assert torch.equal(ks, masker.key_signatures(ctx, key))
            assert torch.equal(qs, pack_signs(masker._signs("query", ctx, ctx.grouped(ctx.query))))
    assert {k[2] for k in masker._placed} == {torch.float32, torch.float64}
    both = masker._placed[0, torch.device("cpu"), torch.float32]
    assert all(w.shape[0] == 2 * hash_heads for w, _ in both)


def test_weights_pickle_may_hold_only_tensors(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({0: {"query_matrix": [os.system]}}, f)
    with pytest.raises(ConfigError, match=r"k: cannot read .*refusing posix.system|k: cannot read .*refusing"):
        HashWeights.load(path, "k")


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    HashWeights.init(2, 4, 32, bits=8, hidden=(6,)).save(tmp_path / "w.safetensors")
    w = HashWeights.load(tmp_path / "w.safetensors", "x.weights")
    with pytest.raises(ConfigError, match=r"x\.weights: weights for 4 heads, but the model has 8 query"):
        w.check(2, 8, 2, 32, "x.weights")
    with pytest.raises(ConfigError, match=r"x\.weights: layer 0 query linear 0 has weight \[4, 32, 6\]"):
        w.check(2, 4, 2, 16, "x.weights")


# --- auto files for the model: shipped for the embedded model, refused elsewhere --------------


def test_embedded_model_ships_hashattn_and_double_sparsity_files():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_dir("tiny-retrieval"))
    hash_ = HashAttention(model=EMBEDDED)
    hash_.prepare(config, "sparse.maskers.hash")
    assert hash_.notes()[0].startswith("hashattn: learned signatures from ") and "hashattn.safetensors" in hash_.notes()[0]
    ds = DoubleSparsity(model=EMBEDDED)
    ds.prepare(config, "sparse.maskers.ds")
    assert ds._rank.shape == (2, 4, 32)


def test_model_without_files_is_refused_naming_the_command():
    with pytest.raises(ConfigError, match=r"^sparse\.maskers\.hash\.weights: no HashAttention weights for "
                                          r"model 'org/some-model'.*`python -m sa_bench\.attention\.train_hashattn "
                                          r"--model org/some-model"):
        SparseMethod.from_config({"name": "h", "maskers": {"hash": {
            "_target_": "sa_bench.attention.hashattn.HashAttention", "model": "org/some-model"}}})
    with pytest.raises(ConfigError, match=r"^sparse\.maskers\.ds\.calibration: no Double Sparsity calibration "
                                          r".*`python -m sa_bench\.attention\.calibrate_ds --model org/m"):
        SparseMethod.from_config({"name": "d", "maskers": {"ds": {
            "_target_": "sa_bench.attention.double_sparsity.DoubleSparsity", "model": "org/m"}}})


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_sweep_refuses_hashattn_for_a_model_without_weights_before_any_job(tmp_path):
    proc = run_sa_bench("model=llama3.1-8b,tiny", "sparse=hashattn", "benchmark.n_samples=1",
                        root=tmp_path / "out")
    assert proc.returncode != 0
    assert "nothing was run" in proc.stdout
    assert "python -m sa_bench.attention.train_hashattn --model meta-llama/Llama-3.1-8B" in proc.stdout
    assert not list((tmp_path / "out").rglob("predictions.jsonl"))


# --- Double Sparsity ---------------------------------------------------------------------------


def test_pseudo_quantize_is_the_authors_rounding():
    x = torch.tensor([[0.0, 0.1, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # 2 bits: levels min + i * (max - min) / 3
    assert torch.allclose(pseudo_quantize(x, 2), torch.tensor([[0.0, 0.0, 2 / 3, 1.0], [2.0] * 4]))
    assert torch.equal(pseudo_quantize(x, 16), x)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 15])
def test_pseudo_quantize_equals_the_authors_steps_bit_for_bit(bits):
    """Fewer kernels than the authors' expression (no clamp, NaN of a constant row turned to 0,
    addcdiv), the same floats; `out` in bfloat16 holds them rounded as `.bfloat16()` does."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 200, 32, generator=g) * torch.rand(3, 200, 1, generator=g) * 10
    x[0, :5] = 1.25  # constant rows: span 0
    x[1, 7, ::2] = -3.0
    top = 2**bits - 1
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    span = hi - lo
    scale = top / torch.where(span == 0, 1.0, span)
    want = torch.round((x - lo) * scale).clamp_(0, top) / scale + lo
    assert torch.equal(pseudo_quantize(x, bits), want)
    out = torch.empty(3, 200, 32, dtype=torch.bfloat16)
    assert pseudo_quantize(x, bits, out=out) is out and torch.equal(out, want.bfloat16())
    assert torch.equal(pseudo_quantize(x, 16, out=out), x.bfloat16())


def test_kv_head_channels_sum_the_group_ranks():
    rank = torch.tensor([[0, 1, 2, 3], [1, 3, 0, 2], [2, 3, 1, 0], [2, 3, 1, 0]])  # channels, best first
    # heads 0 and 1: summed ranks of channels 0..3 are 0 + 2, 1 + 0, 2 + 3, 3 + 1
    assert kv_head_channels(rank, 2, 2).tolist() == [[1, 0], [2, 3]]
    assert torch.equal(kv_head_channels(rank, 4, 4), rank)


@pytest.mark.parametrize("bits", [4, 16])
def test_double_sparsity_matches_brute_force(tmp_path, bits):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    rank = torch.stack([torch.randperm(16, generator=g) for _ in range(4)])[None]
    save_file({"channel_rank": rank}, str(tmp_path / "ds.safetensors"))
    masker = DoubleSparsity(heavy_size=12, channels=0.25, label_bits=bits, calibration=str(tmp_path / "ds.safetensors"))
    cfg = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    masker.prepare(type("Cfg", (), cfg)(), "ds")
    query, key = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    sel = select(masker, query, key)
    ch = kv_head_channels(rank[0], 2, 4)

    def lab(x):  # quantised labels, held in bfloat16 (LABEL_DTYPE)
        return pseudo_quantize(x, bits).bfloat16().float()

    scores = torch.stack([lab(query[0, h][:, ch[h // 2]]) @ lab(key[0, h // 2][:, ch[h // 2]]).T
                          for h in range(4)])[None]
    assert_topk(sel, scores, 12, tol=2**-7 * scores.abs().max().item())  # the product rounds to bf16


def test_double_sparsity_label_cache_holds_fresh_labels_across_steps_crops_and_cells(tmp_path):
    """The new keys' and the query rows' labels are quantised in one pass into the label
    cache (the queries in its rows past the keys): after decode steps, a crop and a new cell
    of another batch size or dtype, the scores equal labels computed from scratch."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    rank = torch.stack([torch.randperm(16, generator=g) for _ in range(4)])[None]
    save_file({"channel_rank": rank}, str(tmp_path / "ds.safetensors"))
    masker = DoubleSparsity(heavy_size=12, calibration=str(tmp_path / "ds.safetensors"))
    cfg = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    masker.prepare(type("Cfg", (), cfg)(), "ds")
    ch = kv_head_channels(rank[0], 2, 4)

    def fresh(query, key):  # labels [b, Hk, n, 4] of each kv head's channels, 4 bits, bf16
        def lab(x):
            channels = ch[None, :, None, :].expand(x.shape[0], 2, x.shape[2], -1)
            return pseudo_quantize(x.gather(-1, channels).float(), 4).bfloat16()
        return lab(context(query, key).grouped(query)) @ lab(key).transpose(-1, -2)

    def check(query, key):
        assert torch.equal(masker._label_scores(context(query, key)), fresh(query, key))

    key = torch.randn(1, 2, 60, 16, generator=g)
    check(torch.randn(1, 4, 1, 16, generator=g), key)
    for _ in range(3):
        key = torch.cat([key, torch.randn(1, 2, 1, 16, generator=g)], 2)
        check(torch.randn(1, 4, 1, 16, generator=g), key)
    masker.truncate(0, 40)  # DynamicCache.crop, then other keys
    key = torch.cat([key[:, :, :40], torch.randn(1, 2, 1, 16, generator=g)], 2)
    check(torch.randn(1, 4, 1, 16, generator=g), key)
    masker.reset()
    check(torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 500, 16, generator=g))
    masker.reset()
    query, key = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    check(query.double(), key.double())


def test_double_sparsity_online_calibration_is_recorded():
    method = SparseMethod.from_config({"name": "d", "maskers": {"ds": {
        "_target_": "sa_bench.attention.double_sparsity.DoubleSparsity", "calibration": "online"}}})
    method.num_layers = 1
    method.set_phase("question")
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 5, 16, generator=g), torch.randn(1, 2, 60, 16, generator=g)
    module = type("M", (), {"layer_idx": 0, "training": False})()
    method.attention(module, query, key, key.clone(), None, 0.25)
    notes = method.stats()["notes"]
    assert notes == ["double_sparsity: channels calibrated online on each context's first sparse call "
                     "(its query rows and their own keys; 5 rows so far), 4-bit labels"]


# --- MagicPIG ----------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2])
def test_magicpig_keeps_exactly_the_keys_with_enough_collisions(m, monkeypatch):
    from sa_bench.attention import magicpig

    monkeypatch.setattr(magicpig, "TAIL", 2)  # every path: tail, second-level tables, rebuild
    monkeypatch.setattr(magicpig, "REBUILD", 5)
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    masker = MagicPig(lsh_bits=3, lsh_tables=6, min_collisions=m)
    levels = set()
    for step in range(12):  # the context, then keys appended one at a time; a crop at step 9
        if step:
            key = torch.cat([key[:, :, :-3] if step == 9 else key, torch.randn(1, 2, 1, 16, generator=g)], 2)
            query = torch.randn(1, 4, 1, 16, generator=g)
        sel = select(masker, query, key)
        levels.add((len(masker._tables[0]), masker._tables[0][-1].n < key.shape[2]))
        planes, mean = masker._planes[0]
        kv, q = key.shape[2], query.shape[2]
        for h in range(4):
            pl = planes[h // 2].view(16, 6, 3)
            kc = key[0, h // 2] - mean[0, h // 2]
            kb = torch.einsum("nd,dlk->nlk", kc, pl) >= 0
            for i in range(q):
                qb = torch.einsum("d,dlk->lk", query[0, h, i], pl) >= 0
                hits = (kb == qb).all(-1).sum(-1)
                want = {j for j in range(kv - q + i + 1) if hits[j] >= m}
                valid = sel.valid[0, h, i]
                assert set(sel.idx[0, h, i][valid].tolist()) == want
                for j, lw in zip(sel.idx[0, h, i][valid].tolist(), sel.logw[0, h, i][valid], strict=True):
                    cos = kc[j] @ query[0, h, i] / (kc[j].norm() * query[0, h, i].norm())
                    p = inclusion_probability(torch.arccos(cos.clamp(-1, 1)), 3, 6, m)
                    assert torch.allclose(lw, -torch.log(p), atol=1e-4)
    assert levels == {(1, False), (1, True), (2, False), (2, True)}


def test_inclusion_probability_at_two_collisions_matches_simulation():
    """Official K = 10, L = 150: a key at angle theta to the query, hashed by independent random
    hyperplanes in each of 3000 trials (kv heads), is sampled as often as the formula says."""
    trials, d = 3000, 4
    g = torch.Generator().manual_seed(0)
    for cos in (0.3, 0.45):
        theta = math.acos(cos)
        q = torch.tensor([1.0, 0.0, 0.0, 0.0])
        k = torch.tensor([cos, math.sin(theta), 0.0, 0.0]) * 2.0
        key = torch.stack([k, -k]).expand(1, trials, 2, d).contiguous()  # mean 0: centring keeps k
        query = q.expand(1, trials, 1, d).contiguous()
        masker = MagicPig(seed=int(cos * 100))
        assert (masker.lsh_bits, masker.lsh_tables, masker.min_collisions) == (10, 150, 2)
        sel = select(masker, query, key)
        picked = ((sel.idx == 0) & sel.valid).any(-1).float().mean().item()
        p = inclusion_probability(torch.tensor(theta), 10, 150, 2).item()
        assert 0.1 < p < 0.9
        assert abs(picked - p) < 4 * math.sqrt(p * (1 - p) / trials), (cos, picked, p)
        # and the formula is P(Binomial(L, (1 - theta/pi)^K) >= 2)
        pk = (1 - theta / math.pi) ** 10
        assert math.isclose(p, 1 - (1 - pk) ** 150 - 150 * pk * (1 - pk) ** 149, rel_tol=1e-5)
    del g


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_online_calibration_is_recorded_in_stats_json(tmp_path):
    proc = run_sa_bench("sparse=double_sparsity", "sparse.maskers.ds.calibration=online",
                        "benchmark.n_samples=1", "benchmark.subsets=[1k]", root=tmp_path / "out", check=True)
    assert "1 jobs" in proc.stdout
    (stats,) = (tmp_path / "out").rglob("stats.json")
    notes = json.loads(stats.read_text())["attention"]["notes"]
    assert len(notes) == 1 and notes[0].startswith("double_sparsity: channels calibrated online")


@pytest.mark.parametrize("target,values,message", [
    ("double_sparsity.DoubleSparsity", {"channels": 0, "calibration": "online"}, r"sparse\.maskers\.m\.channels: expected at least 1"),
    ("double_sparsity.DoubleSparsity", {"label_bits": 17, "calibration": "online"}, r"sparse\.maskers\.m\.label_bits"),
    ("double_sparsity.DoubleSparsity", {"calibration": "/no/such.safetensors"}, r"sparse\.maskers\.m\.calibration: .*not found"),
    ("magicpig.MagicPig", {"min_collisions": 5, "lsh_tables": 4}, r"sparse\.maskers\.m\.min_collisions: 5 > lsh_tables 4"),
    ("magicpig.MagicPig", {"lsh_bits": 16}, r"sparse\.maskers\.m\.lsh_bits"),
    ("hashattn.HashAttention", {"weights": "/no/such.pt"}, r"sparse\.maskers\.m\.weights: hashattn weights file not found"),
    ("hashattn.RandomProjectionTopK", {"bits": 0}, r"sparse\.maskers\.m\.bits"),
])
def test_bad_values_name_their_key(target, values, message):
    with pytest.raises(ConfigError, match=message):
        SparseMethod.from_config({"name": "x", "maskers": {"m": {
            "_target_": f"sa_bench.attention.{target}", **values}}})


def test_double_sparsity_reads_the_authors_channel_config(tmp_path):
    """DoubleSparse's config/<org>/<model>.json: per layer and projection, [H][d] channel indices."""
    g = torch.Generator().manual_seed(4)
    rank = torch.stack([torch.stack([torch.randperm(16, generator=g) for _ in range(4)]) for _ in range(2)])
    config = {}
    for i in range(2):
        config[f"model.layers.{i}.self_attn.q_proj"] = torch.randperm(16).expand(4, 16).tolist()
        config[f"model.layers.{i}.self_attn.k_proj"] = torch.randperm(16).expand(2, 16).tolist()
        config[f"model.layers.{i}.self_attn.qk_proj"] = rank[i].tolist()
    (tmp_path / "Llama-x.json").write_text(json.dumps(config))
    masker = DoubleSparsity(calibration=str(tmp_path / "Llama-x.json"))
    shapes = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    masker.prepare(type("Cfg", (), shapes)(), "sparse.maskers.ds")
    assert torch.equal(masker._rank, rank)  # the qk ranking, as the authors' scripts default to
    del config["model.layers.1.self_attn.qk_proj"], config["model.layers.1.self_attn.q_proj"]
    (tmp_path / "Llama-x.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"sparse\.maskers\.ds\.calibration: .* has no model\.layers"):
        masker.prepare(type("Cfg", (), shapes)(), "sparse.maskers.ds")


# --- issue 21 item 4: one generator per device, weights placed once --------------------------


def test_one_generator_per_device(monkeypatch):
    """A model split over two GPUs alternates devices layer by layer: each device keeps its own
    generator (made and seeded once), so the draws go on instead of restarting at each switch."""
    made = []

    class FakeGenerator:
        def __init__(self, device):
            self.device = device
            made.append(self)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    import sa_bench.attention.method as method_mod
    monkeypatch.setattr(method_mod.torch, "Generator", FakeGenerator)
    method = SparseMethod.from_config({"name": "rs", "maskers": {}})
    dev0, dev1 = torch.device("cuda", 0), torch.device("cuda", 1)
    seen = [method.on_device(d) for _ in range(3) for d in (dev0, dev1)]
    assert len(made) == 2 and [g.device for g in made] == [dev0, dev1]
    assert made[0].seed != made[1].seed
    assert all(seen[i][0] is made[i % 2] and seen[i][1] is seen[i % 2][1] for i in range(6))


def test_generator_keeps_drawing_across_device_switches():
    """With the real CPU generator: the second call on a device continues the stream."""
    method = SparseMethod.from_config({"name": "rs", "maskers": {}})
    g, _ = method.on_device(torch.device("cpu"))
    first = torch.rand(4, generator=g)
    g2, _ = method.on_device(torch.device("cpu"))
    assert g2 is g and not torch.equal(torch.rand(4, generator=g2), first)


def test_hash_weights_placed_once_per_layer_and_dtype(monkeypatch):
    """HashAttention moves and casts a layer's MLP once, not every call."""
    torch.manual_seed(0)
    heads, kv_heads, d = 4, 2, 16
    w = HashWeights.init(2, kv_heads, d, bits=8, hidden=(12,))
    masker = HashAttention.__new__(HashAttention)
    masker._w, masker._placed = w, {}
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *a, **k):  # counts copies, not the no-op casts
        out = real_to(self, *a, **k)
        if out is not self:
            casts.append(1)
        return out

    q = torch.randn(1, heads, 1, d).to(torch.bfloat16)
    key = torch.randn(1, kv_heads, 30, d).to(torch.bfloat16)
    ctx = context(q, key)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    masker._signs("key", ctx, key)
    first = len(casts)
    for _ in range(5):
        masker._signs("key", ctx, key)
        masker._signs("query", ctx, q.reshape(1, kv_heads, 2, d))
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert first == 4  # 2 linears x (weight, bias) of both sides as one MLP, once
    assert len(casts) == first  # the query side a view of it; no cast per call after that
    assert all(t.dtype == torch.bfloat16 for mlp in masker._placed.values() for p in mlp for t in p)


def test_magicpig_segments_select_as_one_table(monkeypatch):
    """Frozen segments of SEGMENT keys (16-bit ids) select exactly what one table does."""
    from sa_bench.attention import magicpig

    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 150, 16, generator=g)
    steps = [(query, key)]
    for _ in range(8):
        key = torch.cat([key, torch.randn(1, 2, 1, 16, generator=g)], 2)
        steps.append((torch.randn(1, 4, 1, 16, generator=g), key))
    monkeypatch.setattr(magicpig, "TAIL", 2)
    monkeypatch.setattr(magicpig, "REBUILD", 5)
    got = {}
    for segment in (10**6, 40):
        monkeypatch.setattr(magicpig, "SEGMENT", segment)
        masker = MagicPig(lsh_bits=3, lsh_tables=6, min_collisions=2)
        got[segment] = [select(masker, q, k) for q, k in steps]
        if segment == 40:
            assert [t.n - t.lo for t in masker._tables[0][:3]] == [40, 40, 40]
            assert all(t.order.dtype == torch.int16 for t in masker._tables[0])
    for a, b in zip(got[10**6], got[40], strict=True):
        assert torch.equal(a.idx, b.idx) and torch.equal(a.valid, b.valid)
        torch.testing.assert_close(a.logw, b.logw)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor any operator makes (bytes), on meta tensors."""

    def __init__(self):
        super().__init__()
        self.made = []  # (bytes, shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.append((t.numel() * t.element_size(), tuple(t.shape)))
        return out


def test_magicpig_memory_per_1k_tokens_at_128k_on_meta():
    """Llama-3.1-8B shapes (8 kv heads, head dim 128, bf16), 131072 keys, L=150, K=10: the
    tables a layer keeps cost <= 2.6 MB per 1k tokens (was 9.6 MB: int16 codes 2.4 MB kept for
    every key plus int32 ids 4.8 MB plus int64 sort temporaries), and no temporary exceeds
    100 MB (was a 7.3 GiB float32 hash product of all keys)."""
    kv, hk, d = 131072, 8, 128
    masker = MagicPig()
    key = torch.empty(1, hk, kv, d, dtype=torch.bfloat16, device="meta")
    planes = torch.empty(hk, d, masker.lsh_tables * masker.lsh_bits, device="meta")
    mean = torch.empty(1, hk, 1, d, device="meta")
    with _Allocations() as alloc:
        tables = masker._layer_tables(0, key, 1, planes, mean)
    kept = sum(t.order.numel() * t.order.element_size() + t.starts.numel() * t.starts.element_size()
               for t in tables)
    per_1k = kept / (kv / 1000)
    assert [(t.lo, t.n) for t in tables] == [(0, 65536), (65536, 131072)]
    assert per_1k < 2.6e6, per_1k  # x 32 layers: 81 MB per 1k tokens, 10.1 GiB at 128k
    kept_shapes = {tuple(t.order.shape) for t in tables} | {tuple(t.starts.shape) for t in tables}
    temporary = max(n for n, shape in alloc.made if shape not in kept_shapes)
    assert temporary < 100e6, temporary


def test_hashattn_first_call_memory_at_128k_on_meta():
    """The first sparse call hashes the whole context: Llama-3.1-8B shapes (32 query / 8 kv
    heads, head dim 128, bf16), 131072 keys, weights per query head with the published MLP
    128-128-32. Signatures are built in blocks: the largest temporary is 16 MiB (was 1 GiB
    each for the keys expanded per head, every MLP activation, the int64 bits and their
    shifted copy, measured the same way), and what a layer keeps is 128 KiB per 1k tokens (one int32 word per key and
    query head)."""
    from sa_bench.attention import hashattn

    kv, h, hk, d = 131072, 32, 8, 128
    masker = HashAttention.__new__(HashAttention)
    masker._w, masker._placed = HashWeights.init(1, h, d, bits=32, hidden=(128, 128)), {}
    key = torch.empty(1, hk, kv, d, dtype=torch.bfloat16, device="meta")
    ctx = context(torch.empty(1, h, 1, d, dtype=torch.bfloat16, device="meta"), key)
    with _Allocations() as alloc:
        sigs = masker.key_signatures(ctx, key)
    assert tuple(sigs.shape) == (1, h, kv, 1) and sigs.dtype == torch.int32
    per_1k = sigs.numel() * sigs.element_size() / (kv / 1000)
    assert per_1k == 128_000  # x 32 layers: 4 MB per 1k tokens, 0.5 GiB at 128k
    temporary = max(n for n, shape in alloc.made if shape != tuple(sigs.shape))
    assert temporary <= hashattn.SIGNATURE_BLOCK_BYTES, temporary
    assert temporary == 16 * 2**20  # 2048-key blocks: keys per head and activations in bf16


@pytest.mark.parametrize("cls", ["hash", "projection"])
def test_key_signatures_in_blocks_equal_one_piece(monkeypatch, cls):
    from sa_bench.attention import hashattn

    g = torch.Generator().manual_seed(3)
    h, hk, d, kv = 4, 2, 16, 37
    if cls == "hash":
        masker = HashAttention.__new__(HashAttention)
        masker._w, masker._placed = HashWeights.init(1, h, d, bits=40, hidden=(24,)), {}
    else:
        masker = RandomProjectionTopK(bits=40)
    key = torch.randn(1, hk, kv, d, generator=g)
    ctx = context(torch.randn(1, h, 1, d, generator=g), key)
    whole = masker.key_signatures(ctx, key)
    monkeypatch.setattr(hashattn, "SIGNATURE_BLOCK_BYTES", 5 * masker._key_width(ctx) * 8)
    blocks = masker.key_signatures(ctx, key)
    assert whole.shape[-1] == 2 and torch.equal(blocks, whole)
