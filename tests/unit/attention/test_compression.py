"""KV-cache compression (sa_bench.attention.compression): budgets, the physical shrink,
decoding from the compressed cache against a brute-force reference, restoring after an
answer, query awareness, composition with Quest, and a ratio sweep that resumes."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from sa_bench import report
from sa_bench.attention import SparseMethod
from sa_bench.attention.compression import TILE, kept_count
from sa_bench.config import ConfigError
from sa_bench.models.forward import with_cache
from sa_bench.models.loading import ModelConfig, load_model
from sa_bench.runner import _answer, _prefill
from tests.conftest import ROOT, run_sa_bench

CPU = torch.device("cpu")
PRESSES = sorted(p.stem for p in (ROOT / "conf/sparse").glob("*.yaml")
                 if "compression:" in p.read_text())
RATIO_PRESSES = [p for p in PRESSES if p not in ("composed", "decoding")]
"""Presses swept by `compression_ratio` (a composition derives its own; decoding has a target size)."""
HEAD_WISE = ("adakv", "critical_adakv")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="tiny", pretrained="embedded:tiny-retrieval"), [])
    text = "the river town woke slowly, boats knocked at the pier; the key is #48213. " * 5
    return model, tok, tok(text).input_ids[:330]


def method_of(name: str, **compression) -> SparseMethod:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/sparse/{name}.yaml"))
    cfg["compression"].update(compression)
    return SparseMethod.from_config(cfg)


def prefilled(model, method, ids, chunk=64, capacity=None):
    method.reset()
    cache, n, _ = _prefill(model, method, tuple(ids), CPU, chunk, capacity)
    return cache, n


def test_every_config_with_compression_is_a_press_listed_here():
    assert {"random", "knorm", "streaming_llm", "snapkv", "pyramidkv", "tova", "observed_attention",
            "expected_attention", "keydiff", "lagkv", "adakv", "criticalkv", "critical_adakv",
            "composed", "decoding", "kvzip"} <= set(PRESSES)


@pytest.mark.parametrize("name", RATIO_PRESSES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_compressed_cache_holds_the_budget_per_head(tiny, install, name, ratio):
    model, tok, ids = tiny
    method = method_of(name, compression_ratio=ratio)
    install(method, model, tokenizer=tok)
    cache, n = prefilled(model, method, ids)
    before = [(e.keys.clone(), e.values.clone()) for e in cache.layers]
    rooms = [e.capacity for e in cache.layers]  # (a press's own passes may grow the buffer)
    method.compress(cache, "context")
    n_layers, hk = len(cache.layers), cache.layers[0].keys.shape[1]
    want = kept_count(n, ratio)
    assert want == math.ceil((1 - ratio) * n)
    stats = method.stats()["compression"]
    if name == "kvzip":  # head-wise over all layers together: their total
        total = sum(int(method.compressor.kept[i][1].sum()) for i in range(n_layers))
        assert total == math.ceil((1 - ratio) * n_layers * hk * n)
    for layer, entry in enumerate(cache.layers):
        idx, valid = method.compressor.kept[layer]
        if name in HEAD_WISE or name == "kvzip":  # stored flat, the cache layer empty
            if name != "kvzip":  # kvzip: a budget over all layers together (above)
                assert int(valid.sum()) == hk * want
            assert entry.keys.shape[2] == 0
            store = method.compressor.heads[layer]
            counts = valid.sum(-1)[0].tolist()
            # on CPU the room the cell still needs moved into the store: each head's slack
            assert store.slack == max(0, rooms[layer] - n)
            # each head's keys, then zeros: its slack, then padding to a tile
            padded = [-(-(c + store.slack) // TILE) * TILE for c in counts]
            assert list(store.counts) == counts and store.values.shape == store.keys.shape
            assert list(store.offsets) == [0, *itertools.accumulate(padded)] and store.keys.shape[0] == sum(padded)
            assert stats["kept_per_head"][layer] == [round(c / n, 6) for c in counts]
            gathered = before[layer][0].gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, store.keys.shape[-1]))
            for head, (start, c) in enumerate(zip(store.offsets[:-1], counts, strict=True)):  # ascending positions
                assert torch.equal(store.keys[start:start + c], gathered[0, head][valid[0, head]])
                assert not store.keys[start + c:store.offsets[head + 1]].any()
            tiles = torch.tensor([i for i, p in enumerate(padded) for _ in range(p // TILE)])
            assert torch.equal(store.tile_segment, tiles)
            ends = torch.tensor(store.offsets[:-1]) + torch.tensor(counts)  # a segment's kept keys
            kept_place = torch.arange(store.keys.shape[0]) < ends[tiles.repeat_interleave(TILE)]
            bias = store.tile_bias.flatten()
            assert bool((bias[kept_place] == 0).all() and torch.isneginf(bias[~kept_place]).all())
            continue
        else:
            budget = method.press.budget(n, layer, n_layers)
            assert entry.keys.shape[2] == budget == (want if name != "pyramidkv" else budget)
            assert valid is None
        assert entry.keys.is_contiguous() and entry.values.shape == entry.keys.shape
        ok = valid if valid is not None else torch.ones_like(idx, dtype=torch.bool)
        assert bool((idx[..., 1:] > idx[..., :-1])[ok[..., 1:]].all())  # ascending, distinct
        gathered = before[layer][0].gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, entry.keys.shape[-1]))
        assert torch.equal(entry.keys[ok], gathered[ok])  # kept keys keep their rotated values
    assert stats["kv_bytes_after"] < stats["kv_bytes_before"]
    if name in HEAD_WISE:  # the bytes of the layer's budget padded to tiles, plus its index
        stores = method.compressor.heads.values()
        keys = sum(s.keys.shape[0] - s.slack * hk for s in stores)  # the slack is not counted
        assert 0 <= keys - n_layers * hk * want < n_layers * hk * TILE
        tiles = keys // TILE  # each with its segment (int64) and its bias row (float32)
        index = tiles * (8 + 4 * TILE) + n_layers * 8 * (2 * hk + 1)
        assert stats["kv_bytes_after"] == stats["kv_bytes_before"] * keys // (n_layers * hk * n) + index
    assert stats["compressions"] == 1 and stats["scoring_s"] >= 0


def restricted_attention(kept: dict, n: int):
    """Brute force: eager attention in which key j < n of kv head h counts only if kept."""
    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        idx, valid = kept[module.layer_idx]
        b, h, q, _ = query.shape
        hk, kv = key.shape[1], key.shape[2]
        ok = valid if valid is not None else torch.ones_like(idx, dtype=torch.bool)
        allow = torch.ones(b, hk, kv, dtype=torch.bool)
        allow[..., :n] = torch.zeros(b, hk, n, dtype=torch.long).scatter_add(-1, idx, ok.long()) > 0
        causal = torch.arange(kv)[None, :] <= (kv - q + torch.arange(q))[:, None]
        mask = allow.repeat_interleave(h // hk, 1)[:, :, None, :] & causal
        k, v = key.repeat_interleave(h // hk, 1), value.repeat_interleave(h // hk, 1)
        w = (query @ k.transpose(-1, -2) * scaling).masked_fill(~mask, float("-inf")).softmax(-1)
        return (w @ v).transpose(1, 2), None
    return attend


@pytest.mark.parametrize(("name", "room"), [
    *((name, None) for name in ["snapkv", "adakv", "expected_attention", "pyramidkv", "criticalkv",
                                "critical_adakv", "composed", "kvzip"]),
    *((name, room) for name in ["adakv", "critical_adakv", "kvzip"] for room in (1, 64))])
def test_decoding_from_the_compressed_cache_is_dense_attention_over_the_kept_positions(tiny, install, name,
                                                                                       room):
    """`room`: positions the cache holds past the context and question (None: none, head-wise
    layers attend by the loop; 1: the question and the first token in each head's slack, the
    second token past it; 64: every step in the slack)."""
    from transformers import AttentionInterface

    model, tok, ids = tiny
    question = tok(" the key is #", add_special_tokens=False).input_ids
    method = method_of(name, compression_ratio=0.6)
    install(method, model, tokenizer=tok)
    capacity = None if room is None else len(ids) + len(question) + room
    cache, n = prefilled(model, method, ids, capacity=capacity)
    method.compress(cache, "context")
    if room is not None:
        assert {s.slack for s in method.compressor.heads.values()} == {len(question) + room}
    kept = dict(method.compressor.kept)
    steps = [question, [17], [23]]
    ours, pos = [], n
    with torch.inference_mode():
        for step in steps:  # the true positions go on after n, the cache holds fewer
            ours.append(model(input_ids=torch.tensor([step]), **with_cache(model, cache),
                              position_ids=torch.arange(pos, pos + len(step))[None]).logits)
            pos += len(step)
    if room == 64:  # the appended keys went into each head's slack, after its kept keys
        for layer, store in method.compressor.heads.items():
            appended = cache.layers[layer].keys[0]  # [Hk, m, d]
            ends = [o + c for o, c in zip(store.offsets[:-1], store.counts, strict=True)]
            assert all(torch.equal(store.keys[e:e + appended.shape[1]], appended[h]) for h, e in enumerate(ends))
    full, _ = prefilled(model, method, ids)  # uncompressed, then the brute-force reference
    AttentionInterface.register("test_restricted", restricted_attention(kept, n))
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("test_restricted")
        with torch.inference_mode():
            for step, logits in zip(steps, ours, strict=True):
                ref = model(input_ids=torch.tensor([step]), **with_cache(model, full)).logits
                torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop("test_restricted", None)


@pytest.mark.parametrize(("name", "query_aware"), [("snapkv", False), ("snapkv", True), ("adakv", False),
                                                   ("adakv", True)])
def test_restoring_after_an_answer_leaves_the_cache_bit_identical(tiny, install, name, query_aware):
    model, tok, ids = tiny
    method = method_of(name, compression_ratio=0.5, query_aware=query_aware)
    install(method, model)
    cache, n = prefilled(model, method, ids, capacity=len(ids) + 64)  # room: head-wise slack
    method.compress(cache, "context")
    saved = method.snapshot(cache)
    copy = [(e.keys.clone(), e.values.clone()) for e in cache.layers]

    def kept(s):  # a head-wise store's kept keys and values (its slack is scratch for answers)
        parts = [slice(o, o + c) for o, c in zip(s.offsets[:-1], s.counts, strict=True)]
        return torch.cat([s.keys[p] for p in parts]), torch.cat([s.values[p] for p in parts])

    stored = {layer: (*kept(s), s.offsets) for layer, s in method.compressor.heads.items()}
    assert all(s.slack == 64 for s in method.compressor.heads.values())
    assert bool(stored) == (name == "adakv" and not query_aware)  # head-wise: stored flat
    answers = []
    for q in [" the key is #", " so the key is #", " the key is #"]:
        answers.append(_answer(model, method, cache, tok(q, add_special_tokens=False).input_ids,
                               6, set(), CPU, start=n))
        method.restore(cache, saved)
        for entry, (k, v) in zip(cache.layers, copy, strict=True):
            assert torch.equal(entry.keys, k) and torch.equal(entry.values, v)
        heads = method.compressor.heads
        assert heads.keys() == stored.keys()
        assert all(torch.equal(kept(heads[i])[0], k) and torch.equal(kept(heads[i])[1], v)
                   and heads[i].offsets == o for i, (k, v, o) in stored.items())
    assert answers[0] == answers[2]  # the same question from the restored cache
    assert method.stats()["compression"]["compressions"] == (3 if query_aware else 1)


def test_query_aware_changes_what_is_kept_only_through_the_question(tiny, install):
    model, tok, ids = tiny
    question = tok(" the key is #", add_special_tokens=False).input_ids
    aware = method_of("snapkv", compression_ratio=0.5, query_aware=True)
    install(aware, model)
    cache, n = prefilled(model, aware, ids)
    aware.compress(cache, "context")  # not at this stage: the cache stays whole
    assert cache.get_seq_length() == n
    _answer(model, aware, cache, question, 1, set(), CPU, start=n)
    with_question = {k: v[0].clone() for k, v in aware.compressor.kept.items()}
    plain = method_of("snapkv", compression_ratio=0.5)
    install(plain, model)
    joined, m = prefilled(model, plain, ids + question)  # context and question as one context
    plain.compress(joined, "context")
    assert m == n + len(question)
    for layer, idx in plain.compressor.kept.items():
        assert torch.equal(idx[0], with_question[layer])
    context_only, _ = prefilled(model, plain, ids)
    plain.compress(context_only, "context")
    assert any(not torch.equal(plain.compressor.kept[i][0], with_question[i]) for i in with_question)


@pytest.mark.parametrize("name", ["snapkv", "observed_attention", "expected_attention", "tova"])
def test_recorded_statistics_do_not_depend_on_the_prefill_chunk(tiny, install, name):
    model, _, ids = tiny
    kept = []
    for chunk in (None, 64, 100):
        method = method_of(name, compression_ratio=0.5)
        install(method, model)
        cache, _ = prefilled(model, method, ids, chunk)
        method.compress(cache, "context")
        kept.append([method.compressor.kept[i][0] for i in range(len(cache.layers))])
    assert all(torch.equal(a, b) for other in kept[1:] for a, b in zip(kept[0], other, strict=True))


def test_compression_then_quest_is_quest_over_the_kept_positions(tiny, install):
    model, tok, ids = tiny
    question = tok(" the key is #", add_special_tokens=False).input_ids
    both = method_of("snapkv_quest", compression_ratio=0.5)
    install(both, model)
    cache, n = prefilled(model, both, ids)
    both.compress(cache, "context")
    kept = dict(both.compressor.kept)
    ours = _answer(model, both, cache, question, 8, set(), CPU, start=n)
    quest = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/quest.yaml"))
    only = SparseMethod.from_config(quest)
    install(only, model)
    full, _ = prefilled(model, only, ids)
    for layer, entry in enumerate(full.layers):  # the kept positions, gathered by hand
        take = kept[layer][0].unsqueeze(-1).expand(-1, -1, -1, entry.keys.shape[-1])
        entry.keys, entry.values = entry.keys.gather(2, take), entry.values.gather(2, take)
    assert ours == _answer(model, only, full, question, 8, set(), CPU, start=n)
    assert both.stats()["density"]["decode"][0] < 1.0  # Quest was active on the compressed cache


def test_config_errors_name_the_key():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/adakv.yaml"))
    bad = {**cfg, "compression": {**cfg["compression"], "compression_ratio": 1.0}}
    with pytest.raises(ConfigError, match=r"sparse\.compression\.compression_ratio"):
        SparseMethod.from_config(bad)
    inner = {**cfg["compression"], "press": {**cfg["compression"]["press"], "compression_ratio": 0.3}}
    with pytest.raises(ConfigError, match=r"sparse\.compression\.press: set compression_ratio"):
        SparseMethod.from_config({**cfg, "compression": inner})
    quest = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/quest.yaml"))
    with pytest.raises(ConfigError, match="head-wise press"):
        SparseMethod.from_config({**cfg, "maskers": quest["maskers"]})


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_a_ratio_sweep_gives_one_directory_per_ratio_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = ["sparse=snapkv", "sparse.compression.compression_ratio=0.25,0.5",
            "benchmark.n_samples=2", "benchmark.subsets=[1k]"]
    first = run_sa_bench(*args, root=out, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert "2 jobs: 0 done (skipped), 2 to run" in first.stdout
    dirs = sorted(p.parent for p in out.rglob("done.json"))
    assert len(dirs) == 2 and all(d.relative_to(out).parts[1:4] == ("snapkv", "passkey", "1k") for d in dirs)
    ratios = set()
    for d in dirs:
        stats = json.loads((d / "stats.json").read_text())["attention"]["compression"]
        ratios.add(stats["compression_ratio"])
        assert stats["kv_bytes_after"] < stats["kv_bytes_before"] and stats["compressions"] >= 1
    assert ratios == {0.25, 0.5}
    jobs = report.read_jobs(out)  # the report reads the compression achieved, as a CSV column
    report.write_csv(jobs, report.build_table(jobs), tmp_path / "results.csv")
    with open(tmp_path / "results.csv", newline="") as f:
        column = sorted(round(float(r["compression"]), 2) for r in csv.DictReader(f))
    assert column == [0.25, 0.5]
    marks = {d: (d / "done.json").stat().st_mtime_ns for d in dirs}
    second = run_sa_bench(*args, root=out, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert "2 jobs: 2 done (skipped), 0 to run" in second.stdout
    assert marks == {d: (d / "done.json").stat().st_mtime_ns for d in dirs}


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_chunk_compresses_each_chunk_on_its_own(tiny, install, ratio):
    model, _, ids = tiny
    method = method_of("chunk", compression_ratio=ratio, chunk_length=100)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    keys = cache.layers[0].keys.clone()
    method.compress(cache, "context")
    idx = method.compressor.kept[0][0]
    for start in range(0, n, 100):
        size = min(100, n - start)
        inside = idx[(idx >= start) & (idx < start + size)].view(1, keys.shape[1], -1)
        assert inside.shape[-1] == math.ceil((1 - ratio) * size)
        norms = keys[:, :, start:start + size].norm(dim=-1)  # KNorm: the smallest norms of the chunk
        want = (-norms).topk(inside.shape[-1], -1).indices.sort(-1).values + start
        assert torch.equal(inside, want)
    with pytest.raises(ConfigError, match="Chunk takes presses that score keys and values only"):
        method_of("chunk", press={"_target_": "sa_bench.attention.presses.SnapKV"})


def test_dense_layers_are_not_compressed(tiny, install):
    model, tok, ids = tiny
    method = method_of("snapkv", compression_ratio=0.5)
    method.config.dense_layers = [1]
    install(method, model)
    cache, n = prefilled(model, method, ids)
    keys = cache.layers[1].keys.clone()
    method.compress(cache, "context")
    assert cache.layers[0].keys.shape[2] == kept_count(n, 0.5) and set(method.compressor.kept) == {0}
    assert torch.equal(cache.layers[1].keys, keys)
    tokens = _answer(model, method, cache, tok(" the key is #", add_special_tokens=False).input_ids,
                     4, set(), CPU, start=n)
    assert len(tokens) == 4 and method.stats()["compression"]["kept_per_layer"][1] is None


# --- wrappers: CriticalKV, CriticalAdaKV, composition, compression while decoding ---------------

def test_value_projection_norm_is_the_l1_norm_of_each_head_output(tiny, install):
    from sa_bench.attention.wrappers import value_projection_norm

    model, _, ids = tiny
    method = method_of("criticalkv", compression_ratio=0.5)
    install(method, model)
    cache, _ = prefilled(model, method, ids)
    layer = 1
    values = cache.layers[layer].values
    weight = model.model.layers[layer].self_attn.o_proj.weight.detach()
    obs = method.compressor.observation(layer, cache.layers[layer].keys, values)
    heads, (hk, d) = weight.shape[1] // values.shape[-1], values.shape[1::2]
    brute = torch.stack([torch.stack([
        (values[0, h // (heads // hk)] @ weight[:, h * d:(h + 1) * d].T).abs().sum(-1)
        for h in range(g * heads // hk, (g + 1) * heads // hk)]).mean(0) for g in range(hk)])
    torch.testing.assert_close(value_projection_norm(obs)[0], brute, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_criticalkv_keeps_the_first_stage_then_the_rescored_best(tiny, install, ratio):
    from sa_bench.attention.wrappers import value_projection_norm

    model, _, ids = tiny
    method = method_of("criticalkv", compression_ratio=ratio)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    obs = [method.compressor.observation(i, e.keys, e.values) for i, e in enumerate(cache.layers)]
    method.compress(cache, "context")
    k, first = kept_count(n, ratio), int((1 - ratio) * n * 0.5)
    for layer, o in enumerate(obs):
        base = method.press.press.score(o)
        rescored = (base + 1e-4) * value_projection_norm(o)
        idx, _ = method.compressor.kept[layer]
        for h in range(idx.shape[1]):
            stage1 = set(base[0, h].topk(first).indices.tolist())
            rest = [i for i in rescored[0, h].argsort(descending=True).tolist() if i not in stage1]
            assert set(idx[0, h].tolist()) == stage1 | set(rest[:k - first])


def test_critical_adakv_spends_the_layer_budget_head_wise(tiny, install):
    model, _, ids = tiny
    method = method_of("critical_adakv", compression_ratio=0.75)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    method.compress(cache, "context")
    k = kept_count(n, 0.75)
    for layer in range(len(cache.layers)):
        _, valid = method.compressor.kept[layer]
        per_head = valid.sum(-1)[0]
        assert int(per_head.sum()) == valid.shape[1] * k and int(per_head.min()) >= int(k * 0.2)
    assert method.stats()["compression"]["kv_bytes_after"] < method.stats()["compression"]["kv_bytes_before"]


def test_composed_applies_each_press_to_what_the_previous_kept(tiny, install):
    model, _, ids = tiny
    method = method_of("composed")
    assert method.press.compression_ratio == pytest.approx(0.6)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    obs = [method.compressor.observation(i, e.keys, e.values) for i, e in enumerate(cache.layers)]
    method.compress(cache, "context")
    snap, knorm = method.press.presses
    for layer, o in enumerate(obs):
        first, _ = snap.keep(o)
        keys = o.keys.gather(2, first.unsqueeze(-1).expand(-1, -1, -1, o.keys.shape[-1]))
        second = (-keys.norm(dim=-1)).topk(kept_count(first.shape[-1], 0.2), -1).indices.sort(-1).values
        idx, _ = method.compressor.kept[layer]
        assert torch.equal(idx, first.gather(-1, second))
        assert cache.layers[layer].keys.shape[2] == kept_count(kept_count(n, 0.5), 0.2)


def test_decoding_compresses_every_interval_and_decodes_as_dense_over_the_kept(tiny, install):
    from transformers import AttentionInterface

    model, tok, ids = tiny
    method = method_of("decoding", target_size=200, compression_interval=4)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    method.compress(cache, "context")
    assert cache.layers[0].keys.shape[2] == n  # the context is not compressed after its prefill
    question = tok(" the key is #", add_special_tokens=False).input_ids
    steps = [question, [17], [23], [31], [5], [9]]  # compressed after the 4th pass
    ours, pos, lengths = [], n, []
    method.set_phase("question")
    with torch.inference_mode():
        for step in steps:
            ours.append(model(input_ids=torch.tensor([step]), **with_cache(model, cache),
                              position_ids=torch.arange(pos, pos + len(step))[None]).logits)
            pos += len(step)
            method.step(cache, len(step))
            method.set_phase("decode")
            lengths.append(cache.layers[0].keys.shape[2])
    n1 = n + len(question) + 3
    assert lengths == [n + len(question), n1 - 2, n1 - 1, 200, 201, 202]
    assert method.stats()["compression"]["compressions"] == 1
    kept = dict(method.compressor.kept)
    full, _ = prefilled(model, method, ids)
    previous = model.config._attn_implementation
    AttentionInterface.register("test_restricted", restricted_attention(kept, n1))
    try:
        with torch.inference_mode():
            for step, logits in zip(steps[:4], ours, strict=False):
                ref = model(input_ids=torch.tensor([step]), **with_cache(model, full)).logits
                torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)
            model.set_attn_implementation("test_restricted")
            for step, logits in zip(steps[4:], ours[4:], strict=True):
                ref = model(input_ids=torch.tensor([step]), **with_cache(model, full)).logits
                torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop("test_restricted", None)


def test_decoding_over_observed_attention_reads_the_attention_of_the_passes_since_compression(tiny, install):
    """Decoding over ObservedAttention: the kept positions are the best of the attention the
    four passes paid each key (eager brute force on the uncompressed cache), each key divided
    by the rows that could see it, averaged over a kv head's query heads."""
    from transformers import AttentionInterface

    model, tok, ids = tiny
    press = {"_target_": "sa_bench.attention.presses.ObservedAttention"}
    method = method_of("decoding", target_size=200, compression_interval=4, press=press)
    install(method, model)
    question = tok(" the key is #", add_special_tokens=False).input_ids
    steps = [question, [17], [23], [31]]

    def feed(cache, n, step_done=lambda q: None):
        pos = n
        with torch.inference_mode():
            for step in steps:
                model(input_ids=torch.tensor([step]), **with_cache(model, cache),
                      position_ids=torch.arange(pos, pos + len(step))[None])
                pos += len(step)
                step_done(len(step))

    cache, n = prefilled(model, method, ids)
    method.set_phase("question")
    feed(cache, n, lambda q: (method.step(cache, q), method.set_phase("decode")))
    assert method.stats()["compression"]["compressions"] == 1
    full, _ = prefilled(model, method, ids)
    sums: dict[int, list] = {}

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, kv, g = query.shape[2], key.shape[2], query.shape[1] // key.shape[1]
        causal = torch.arange(kv)[None, :] <= (kv - q + torch.arange(q))[:, None]
        w = (query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf"))
        w = w.softmax(-1)
        sums.setdefault(module.layer_idx, []).append(w.sum(2))
        return (w @ value.repeat_interleave(g, 1)).transpose(1, 2), None

    previous = model.config._attn_implementation
    AttentionInterface.register("test_recording", recording)
    try:
        model.set_attn_implementation("test_recording")
        feed(full, n)
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop("test_recording", None)
    n1, rows = n + len(question) + 3, len(question) + 3
    for layer, parts in sums.items():
        total = sum(torch.nn.functional.pad(p, (0, n1 - p.shape[-1])) for p in parts)
        scores = total / torch.arange(n1, 0, -1).clamp(max=rows)
        hk = cache.layers[layer].keys.shape[1]
        scores = scores.view(1, hk, -1, n1).mean(2)
        want = scores.topk(200, -1).indices.sort(-1).values
        assert torch.equal(method.compressor.kept[layer][0], want), layer


def test_decoding_restores_the_cache_and_its_step_count_after_each_answer(tiny, install):
    model, tok, ids = tiny
    method = method_of("decoding", target_size=150, compression_interval=3)
    install(method, model)
    cache, n = prefilled(model, method, ids)
    saved = method.snapshot(cache)
    question = tok(" the key is #", add_special_tokens=False).input_ids
    first = _answer(model, method, cache, question, 7, set(), CPU, start=n)
    method.restore(cache, saved)
    assert cache.layers[0].keys.shape[2] == n and method.compressor.steps == 0
    assert _answer(model, method, cache, question, 7, set(), CPU, start=n) == first
    assert method.stats()["compression"]["compressions"] == 4  # after passes 3 and 6, twice


def test_wrapper_config_errors_name_the_key():
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/decoding.yaml"))
    snap = {"_target_": "sa_bench.attention.presses.SnapKV", "window_size": 64}
    with pytest.raises(ConfigError, match=r"sparse\.compression\.press: SnapKV reads the last 64"):
        SparseMethod.from_config({**base, "compression": {**base["compression"], "press": snap,
                                                          "compression_interval": 16}})
    knorm = {"_target_": "sa_bench.attention.presses.KNorm"}
    refused = {"AdaKV is head-wise": {"_target_": "sa_bench.attention.compression.AdaKV", "press": knorm},
               "PerLayer is not a scoring press": {"_target_": "sa_bench.attention.compression.PerLayer",
                                                   "press": knorm, "compression_ratios": [0.5]},
               "Chunk is not a scoring press": {"_target_": "sa_bench.attention.compression.Chunk",
                                                "press": knorm}}
    for message, press in refused.items():
        with pytest.raises(ConfigError, match=rf"sparse\.compression\.press: {message}"):
            SparseMethod.from_config({**base, "compression": {**base["compression"], "press": press}})
    composed = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/composed.yaml"))
    with pytest.raises(ConfigError, match=r"sparse\.compression\.compression_ratio: derived"):
        SparseMethod.from_config({**composed, "compression": {**composed["compression"], "compression_ratio": 0.3}})
    ada = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/adakv.yaml"))["compression"]
    ada["press"] = {**ada["press"]}
    with pytest.raises(ConfigError, match=r"sparse\.compression\.presses\[1\]: AdaKV does not compose"):
        SparseMethod.from_config({**composed, "compression": {**composed["compression"], "presses": [
            composed["compression"]["presses"][0], {**ada, "compression_ratio": 0.5}]}})
    critical = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/criticalkv.yaml"))
    with pytest.raises(ConfigError, match=r"sparse\.compression\.first_stage_ratio"):
        SparseMethod.from_config({**critical, "compression": {**critical["compression"], "first_stage_ratio": 1.5}})


def test_qfilter_scores_keys_by_its_local_filters_and_is_refused_without_them(tiny, install, tmp_path):
    from safetensors.torch import save_file

    model, _, ids = tiny
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/knorm.yaml"))
    press = {"_target_": "sa_bench.attention.presses.QFilter", "compression_ratio": 0.5}
    with pytest.raises(ConfigError, match=r"sparse\.compression\.filters: missing: kvpress downloads"):
        SparseMethod.from_config({**cfg, "compression": press})
    with pytest.raises(ConfigError, match=r"sparse\.compression\.filters: 'nthngdy/x_qfilt' is neither"):
        SparseMethod.from_config({**cfg, "compression": {**press, "filters": "nthngdy/x_qfilt"}})
    layers, hk, d = len(model.model.layers), model.config.num_key_value_heads, model.config.head_dim
    filters = torch.randn(layers, hk, d)
    save_file({"q_filters": filters}, str(tmp_path / "qf.safetensors"))
    method = SparseMethod.from_config({**cfg, "compression": {**press, "filters": str(tmp_path / "qf.safetensors")}})
    install(method, model)
    cache, n = prefilled(model, method, ids)
    keys = [e.keys.clone() for e in cache.layers]
    method.compress(cache, "context")
    for layer, k in enumerate(keys):
        want = (-(filters[layer][None, :, None] * k).sum(-1)).topk(kept_count(n, 0.5), -1).indices.sort(-1).values
        assert torch.equal(method.compressor.kept[layer][0], want)


# --- KVzip: context reconstruction -------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [100, 4096])
def test_kvzip_feeds_the_repeat_prompt_and_the_context_in_chunks_and_counts_the_passes(tiny, install, chunk_size):
    from sa_bench.attention.kvzip import FIRST_PROMPT, LATER_PROMPT

    model, tok, ids = tiny
    method = method_of("kvzip", compression_ratio=0.5, chunk_size=chunk_size)
    install(method, model, tokenizer=tok)
    cache, n = prefilled(model, method, ids)
    fed = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: fed.append(a[0][0].tolist()))
    try:
        method.compress(cache, "context")
    finally:
        hook.remove()
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chunks = [ids[i:i + chunk_size] for i in range(0, n, chunk_size)]
    want = [(enc(FIRST_PROMPT) if i == 0 else enc(LATER_PROMPT) + chunks[i - 1][-8:]) + enc("\n") + chunk
            for i, chunk in enumerate(chunks)]  # no chat template: no prefix, suffix "\n"
    assert fed == want and len(want) == (4 if chunk_size == 100 else 1)
    stats = method.stats()["compression"]
    assert stats["reconstruction_passes"] == len(want)
    assert stats["reconstruction_tokens"] == sum(map(len, want)) and stats["reconstruction_s"] > 0
    assert all(e.keys.shape[2] < n for e in cache.layers)  # the passes' own keys went, then the pruned
    assert method.compressor.context_ids  # recorded during the prefill, not during the passes
    assert torch.cat(method.compressor.context_ids, -1)[0].tolist() == ids


def test_kvzip_scores_are_the_largest_attention_a_reconstruction_query_pays(monkeypatch):
    from sa_bench.attention import kvzip

    monkeypatch.setattr(kvzip, "ROW_BLOCK_BYTES", 4 * 2 * 6 * 40)  # several blocks of rows
    g = torch.Generator().manual_seed(0)
    n, q, hk, group, d, start, end = 30, 12, 2, 3, 8, 9, 21
    query = torch.randn(1, hk * group, q, d, generator=g)
    key = torch.randn(1, hk, n + q, d, generator=g)
    press = kvzip.KVzip(compression_ratio=0.5, n_sink=4)
    got = press.chunk_scores(query, key, start, end)
    want = torch.zeros(1, hk, end - start)
    for h in range(hk * group):  # brute force: a softmax over every column, masked
        for i in range(q):
            allowed = torch.zeros(n + q, dtype=torch.bool)
            allowed[:4] = allowed[start:end] = True
            allowed[n:n + i + 1] = True
            logits = (key[0, h // group] @ query[0, h, i]) / math.sqrt(d)
            p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)[start:end]
            want[0, h // group] = torch.maximum(want[0, h // group], p)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layerwise", [False, True])
def test_kvzip_keeps_the_best_scores_over_all_layers_or_each_layer(layerwise):
    from sa_bench.attention.kvzip import KVzip

    g = torch.Generator().manual_seed(1)
    scores = {layer: torch.rand(1, 2, 50, generator=g) * (layer + 1) for layer in range(3)}
    kept = KVzip(compression_ratio=0.7, layerwise=layerwise).allocate(scores)
    groups = [[layer] for layer in scores] if layerwise else [list(scores)]
    for layers in groups:
        mask = torch.cat([kept[i].flatten() for i in layers])
        values = torch.cat([scores[i].flatten() for i in layers])
        assert int(mask.sum()) == math.ceil(0.3 * values.numel())
        assert values[mask].min() > values[~mask].max()
    counts = [int(kept[i].sum()) for i in scores]
    assert (len(set(counts)) == 1) == layerwise  # global: the layers of larger scores keep more


class ChatTokenizer:
    """Bytes, with a chat template around the user's message."""

    chat_template = "<chat>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, enable_thinking):
        return f"<u>{messages[0]['content']}</u><a>"


def test_kvzip_takes_the_chat_template_prefix_and_suffix_when_the_context_used_it():
    from sa_bench.attention.kvzip import KVzip, template_tokens

    tok = ChatTokenizer()
    context = list(b"<u>some context")
    assert template_tokens(tok, context) == (3, list(b"</u><a>"))
    assert template_tokens(tok, list(b"some context")) == (0, [10])  # not rendered with it
    (start, end, fed), = KVzip(compression_ratio=0.5).passes(context, tok)
    assert (start, end) == (3, len(context))  # the template's prefix is not scored
    assert fed == list(b"\n\nRepeat the previous context exactly.</u><a>some context")


def test_kvzip_rewinds_every_layer_after_its_passes_dense_layers_and_presized_ones_too(tiny, install):
    """The reconstruction passes append to every cache layer; each is cropped back through the
    layer's own `crop` (a pre-sized layer keeps its buffer): a dense layer ends bit-identical
    to before, a layer that cannot be cropped is refused before any pass."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from sa_bench.attention.kv_cache import is_presized

    model, tok, ids = tiny
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/sparse/kvzip.yaml"))
    method = SparseMethod.from_config({**cfg, "dense_layers": [0]})
    install(method, model, tokenizer=tok)
    method.reset()
    cache, n, _ = _prefill(model, method, tuple(ids), CPU, 64, 1024)
    assert all(is_presized(e) for e in cache.layers)
    before = cache.layers[0].keys.clone(), cache.layers[0].values.clone()
    method.compress(cache, "context")
    assert torch.equal(cache.layers[0].keys, before[0]) and torch.equal(cache.layers[0].values, before[1])
    assert cache.layers[0].keys.untyped_storage().nbytes() > before[0].nbytes  # still its buffer
    assert all(e.keys.shape[2] < n for e in cache.layers[1:])

    method.reset()
    cache, n, _ = _prefill(model, method, tuple(ids), CPU, 64)
    sliding = DynamicSlidingWindowLayer(sliding_window=4 * n)
    sliding.update(cache.layers[0].keys, cache.layers[0].values)
    cache.layers[0] = sliding
    with pytest.raises(ValueError, match="layer 0 is a DynamicSlidingWindowLayer"):
        method.compress(cache, "context")


def test_kvzip_config_and_tokenizer_errors(tiny, install):
    with pytest.raises(ConfigError, match="query_aware: KVzip is query-agnostic"):
        method_of("kvzip", query_aware=True)
    with pytest.raises(ConfigError, match=r"press: KVzip decides its own head-wise budgets"):
        method_of("adakv", press={"_target_": "sa_bench.attention.kvzip.KVzip"})
    with pytest.raises(ConfigError, match="chunk_size"):
        method_of("kvzip", chunk_size=0)
    model, _, ids = tiny
    method = method_of("kvzip")
    install(method, model)  # no tokenizer
    cache, _ = prefilled(model, method, ids)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        method.compress(cache, "context")


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_a_kvzip_job_records_its_reconstruction_passes(tmp_path):
    out = tmp_path / "out"
    run_sa_bench("sparse=kvzip", "benchmark.n_samples=1", "benchmark.subsets=[1k]", root=out,
                 env={"PYTHONPATH": str(ROOT)}, check=True)
    stats, = [json.loads(p.read_text()) for p in out.rglob("stats.json")]
    comp = stats["attention"]["compression"]
    assert comp["press"] == "KVzip" and comp["reconstruction_passes"] >= 1
    assert comp["reconstruction_tokens"] > stats["max_prompt_tokens"] // 2 and comp["reconstruction_s"] > 0
    assert abs(comp["achieved_ratio"] - 0.5) < 0.01 and stats["compress_s"] >= comp["reconstruction_s"]
