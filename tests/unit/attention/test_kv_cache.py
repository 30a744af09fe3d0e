"""The job's pre-sized KV cache (`sa_bench.attention.kv_cache`): decode steps write the new
position in place (no copy of a whole cache layer per token, counted at the dispatcher, where
transformers' DynamicCache makes two per layer and token), answers bit-identical to the
DynamicCache path, rewinds and restores that reuse the buffer, compression that frees memory,
methods' key caches that grow amortized, other layer kinds left to transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from sa_bench.attention import SparseMethod, kv_cache
from sa_bench.attention.kv_cache import is_presized, presized_cache, room
from sa_bench.attention.selection import KeyCache
from sa_bench.perf.counts import LargeWrites
from sa_bench.runner import _answer, _prefill, _rewind
from tests.unit.attention.test_attention_hook import ids, load, make

CPU = torch.device("cpu")
CTX, QUESTION, NEW = 400, 8, 6
TOKENS = ids(CTX + 2 * QUESTION, seed=3)[0].tolist()
CONTEXT, FIRST, SECOND = TOKENS[:CTX], TOKENS[CTX:CTX + QUESTION], TOKENS[CTX + QUESTION:]


def answers(install, name: str, presized: bool, monkeypatch, device=CPU,
            dtype=torch.float32) -> dict:
    """The runner's path on a tiny random Llama: prefill, compress (a press), two questions
    with the cache rewound or restored between them. -> the logits of every forward pass,
    the tokens, and the ops that wrote a tensor of a whole cache layer in decode steps."""
    if not presized:  # the path before pre-sizing: transformers' DynamicCache
        monkeypatch.setattr(kv_cache, "presized_cache", lambda config, cap: DynamicCache(config=config))
    model = make("llama")[0].to(device, dtype)
    method = SparseMethod.from_config(load(name))
    install(method, model)
    logits, writes, counting = [], LargeWrites(0), []

    def before(module, args):  # decode passes only: a question's scores are [q x kv] per head
        if method.phase == "decode":
            counting.append(writes.__enter__())

    def after(module, args, out):
        if counting:
            counting.pop().__exit__(None, None, None)
        logits.append(out.logits.clone())

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    method.reset()
    capacity = kv_cache.capacity(CTX + QUESTION, NEW)
    cache, n, _ = _prefill(model, method, tuple(CONTEXT), device, 128, capacity)
    method.compress(cache, "context")
    saved = method.snapshot(cache) if method.compresses else None
    writes.min_bytes = min(layer.keys.nbytes for layer in cache.layers)
    tokens = []
    for question in (FIRST, SECOND):
        tokens.append(_answer(model, method, cache, question, NEW, set(), device, start=n))
        if saved is None:
            _rewind(cache, n)
        else:
            method.restore(cache, saved)
    return {"logits": logits, "tokens": tokens, "writes": writes.names, "cache": cache}


@pytest.mark.parametrize("name", ["dense", "quest", "knorm"])
def test_decode_steps_copy_no_cache_layer_and_answer_as_before(install, monkeypatch, name):
    new = answers(install, name, True, monkeypatch)
    assert all(is_presized(layer) for layer in new["cache"].layers)
    assert sum(new["writes"].values()) == 0, new["writes"]
    old = answers(install, name, False, monkeypatch)
    layers = len(old["cache"].layers)
    # the counter sees DynamicCache's copies: keys and values of every layer, every step
    assert old["writes"]["cat"] == 2 * layers * 2 * (NEW - 1)
    assert new["tokens"] == old["tokens"] and len(new["tokens"][1]) == NEW
    assert len(new["logits"]) == len(old["logits"])
    for a, b in zip(new["logits"], old["logits"], strict=True):
        assert torch.equal(a, b)


def test_rewinds_and_restores_reuse_the_buffer_and_compression_frees_memory(install, monkeypatch):
    dense = answers(install, "dense", True, monkeypatch)["cache"]
    capacity = kv_cache.capacity(CTX + QUESTION, NEW)
    for layer in dense.layers:  # two questions, rewound: still the first buffer, context long
        assert layer.get_seq_length() == CTX and room(layer.keys) == capacity
        assert layer.keys.untyped_storage().nbytes() == layer.keys[:, :, :1].nbytes * capacity
    model, _ = make("llama")
    method = SparseMethod.from_config(load("knorm"))  # ratio 0.5
    install(method, model)
    method.reset()
    cache, n, _ = _prefill(model, method, tuple(CONTEXT), CPU, 128, capacity)
    before = [layer.keys.untyped_storage().nbytes() for layer in cache.layers]
    method.compress(cache, "context")
    saved = method.snapshot(cache)
    kept = CTX // 2
    buffers = []
    for layer, size in zip(cache.layers, before, strict=True):
        assert layer.get_seq_length() == kept
        assert room(layer.keys) == kept + capacity - CTX  # the room for question and answer kept
        row = layer.keys[:, :, :1].nbytes  # the old buffer goes: memory falls by CTX - kept rows
        assert layer.keys.untyped_storage().nbytes() == size - (CTX - kept) * row
        buffers.append(layer.keys.data_ptr())
    for _ in range(2):
        _answer(model, method, cache, FIRST, NEW, set(), CPU, start=n)
        assert [layer.keys.data_ptr() for layer in cache.layers] == buffers  # written in place
        method.restore(cache, saved)
        assert [layer.get_seq_length() for layer in cache.layers] == [kept] * len(buffers)


def test_a_layer_without_capacity_grows_by_doubling():
    layer = kv_cache.presized_layer()(0)
    k = torch.randn(1, 2, 5, 4)
    grown = 0
    with torch.inference_mode():
        layer.update(k, k)
        for i in range(1000):
            ptr = layer.keys.data_ptr()
            layer.update(k[:, :, :1], k[:, :, :1] + i)
            grown += layer.keys.data_ptr() != ptr
        assert layer.get_seq_length() == 1005 and grown <= 8
        assert torch.equal(layer.keys[:, :, :5], k) and torch.equal(layer.values[:, :, -1:], k[:, :, :1] + 999)
        layer.crop(-600)
        keys, _ = layer.update(k, k)  # in place after a crop: the buffer keeps its contents
        assert keys.data_ptr() == ptr and torch.equal(keys[:, :, 405:], k)


def test_only_full_attention_layers_are_presized():
    from tests.unit.models.test_model_families import config

    cache = presized_cache(config("gemma3"), 512)  # sliding, full, sliding, full
    assert [type(layer) for layer in cache.layers[::2]] == [DynamicSlidingWindowLayer] * 2
    assert all(is_presized(layer) and isinstance(layer, DynamicLayer) for layer in cache.layers[1::2])
    lazy = presized_cache(None, 512)  # no config: layers made on first use
    lazy.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 1)
    assert all(is_presized(layer) for layer in lazy.layers) and room(lazy.layers[1].keys) == 512


def test_methods_key_caches_grow_amortized():
    """`KeyCache` (hash signatures, codes, Quest's page statistics) appends into a buffer with
    spare room: a feature row per decode step reallocates a handful of times in 2,000 steps."""
    cache, grown = KeyCache(), 0
    key = torch.randn(1, 2, 100, 4)
    cache.get(0, key, 100, lambda k: k * 2)
    for _ in range(2000):
        ptr = cache.buf[0].data_ptr()
        key = torch.cat([key, torch.randn(1, 2, 1, 4)], 2)
        out = cache.get(0, key, 1, lambda k: k * 2)
        grown += cache.buf[0].data_ptr() != ptr
    assert grown <= 8 and torch.equal(out, key * 2)
