"""Dense attention kernels (sa_bench.attention.dense): masks, causal alignment, row blocks."""

from __future__ import annotations

import types

import pytest
import torch

from sa_bench.attention import dense
from sa_bench.attention.dense import eager_attention

torch.set_num_threads(1)
MODULE = types.SimpleNamespace(training=False)


def qkv(q, kv, h=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, q, d, generator=g), torch.randn(1, hk, kv, d, generator=g),
            torch.randn(1, hk, kv, d, generator=g))


def eager_causal(query, key, value):
    """Reference: eager math with a float bottom-right causal mask."""
    q, kv = query.shape[2], key.shape[2]
    allowed = torch.arange(kv)[None, :] <= (kv - q + torch.arange(q))[:, None]
    mask = torch.zeros(1, 1, q, kv).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return eager_attention(MODULE, query, key, value, mask, query.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("q,kv", [(1, 37), (9, 9), (9, 40), (64, 200)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_without_a_mask_is_bottom_right(q, kv, impl):
    query, key, value = qkv(q, kv)
    got = dense.dense_attention(MODULE, query, key, value, None, query.shape[-1] ** -0.5, impl)
    torch.testing.assert_close(got, eager_causal(query, key, value), atol=1e-5, rtol=1e-5)


def test_row_blocks_respect_the_mask_budget(monkeypatch):
    assert dense.rows_per_block(4096, 131072) * 131072 <= dense.MASK_BLOCK_BYTES
    assert dense.rows_per_block(4096, 131072) == 512
    assert dense.rows_per_block(100, 1000) == 100 and dense.rows_per_block(5, 10**9) == 1
    calls = []
    real = dense._sdpa

    def spy(query, key, value, mask, scaling, is_causal=False):
        calls.append((query.shape[2], key.shape[2], None if mask is None else mask.numel()))
        return real(query, key, value, mask, scaling, is_causal)

    monkeypatch.setattr(dense, "_sdpa", spy)
    monkeypatch.setattr(dense, "MASK_BLOCK_BYTES", 10 * 300)  # 10 rows of 300 keys per call
    query, key, value = qkv(64, 300)  # 2 query heads per kv head: 5 rows, folded into 10
    got = dense.dense_attention(MODULE, query, key, value, None, 0.25, "sdpa")
    assert [c[0] for c in calls] == [5] * 12 + [4]
    assert all(rows * width == size and 2 * size <= 3000 for rows, width, size in calls)
    assert [c[1] for c in calls] == [300 - 64 + r for r in range(5, 61, 5)] + [300]
    torch.testing.assert_close(got, eager_causal(query, key, value), atol=1e-5, rtol=1e-5)


def test_mask_function_skips_plain_causal_only():
    from transformers.masking_utils import sliding_window_causal_mask_function

    # a prefill chunk after 100 cached tokens, no padding: no mask at all
    assert dense.dense_mask(1, 50, 150, q_offset=100) is None
    assert dense.dense_mask(1, 1, 151, q_offset=150, attention_mask=torch.ones(1, 151)) is None
    # padding: transformers' boolean mask
    pad = torch.ones(1, 150, dtype=torch.bool)
    pad[0, :3] = False
    mask = dense.dense_mask(1, 50, 150, q_offset=100, attention_mask=pad)
    assert mask.shape == (1, 1, 50, 150) and mask.dtype == torch.bool
    assert not mask[0, 0, :, :3].any() and mask[0, 0, -1, 3:].all() and not mask[0, 0, 0, -1]
    # a sliding window: its own mask
    window = dense.dense_mask(1, 4, 40, q_offset=36,
                              mask_function=sliding_window_causal_mask_function(8), local_size=8)
    assert window is not None and window[0, 0, -1].sum() == 8
    # a window longer than every key so far is plain causal
    assert dense.dense_mask(1, 4, 40, q_offset=36, local_size=64,
                            mask_function=sliding_window_causal_mask_function(64)) is None
    # a caller that adds more than causality forbids the skip
    assert dense.dense_mask(1, 50, 150, q_offset=100, allow_is_causal_skip=False) is not None


def test_padding_mask_is_applied():
    query, key, value = qkv(5, 30)
    pad = torch.ones(1, 30, dtype=torch.bool)
    pad[0, :4] = False
    mask = dense.dense_mask(1, 5, 30, q_offset=25, attention_mask=pad)
    got = dense.dense_attention(MODULE, query, key, value, mask, 0.25, "sdpa")
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    want = eager_attention(MODULE, query, key, value, float_mask, 0.25)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = dense.dense_attention(MODULE, query[:, :, -1:], key, value, mask[:, :, -1:], 0.25, "sdpa")
    torch.testing.assert_close(one, want[:, -1:], atol=1e-5, rtol=1e-5)


def test_implementation_choice():
    cpu = torch.device("cpu")
    assert dense.resolve_implementation("auto", cpu, torch.float32) == "sdpa"
    assert dense.resolve_implementation("eager", cpu, torch.float32) == "eager"
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash_attn package"):
        dense.resolve_implementation("flash_attention_2", cpu, torch.bfloat16)


@pytest.mark.parametrize("q,rows", [(7, 7), (7, 1), (1, 1)])
def test_masked_gqa_folds_query_heads_into_rows(monkeypatch, q, rows):
    """Issue 21 item 7: a boolean mask with GQA goes to SDPA without `enable_gqa` (which has no
    flash / memory-efficient kernel with a mask): the query heads of a kv head become its rows,
    the mask repeated per head; same output as enable_gqa."""
    query, key, value = qkv(q, 40, h=8, hk=2)
    mask = torch.rand(1, 1, rows, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append((a[0].shape, k.get("enable_gqa", False), k["attn_mask"].shape))
        return real(*a, **k)

    monkeypatch.setattr(dense, "F", types.SimpleNamespace(scaled_dot_product_attention=spy))
    got = dense._sdpa(query, key, value, mask, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (shape, gqa, mask_shape), = seen
    assert not gqa and shape == (1, 2, 4 * q, 16)
    assert mask_shape[-2] in (1, 4 * q)


def test_padding_mask_prefill_chunk_matches_eager():
    """A prefill chunk after cached keys with a padding mask: folded SDPA == eager."""
    query, key, value = qkv(9, 40, h=8, hk=2)
    allowed = torch.arange(40)[None, :] <= (40 - 9 + torch.arange(9))[:, None]
    allowed[:, :3] = False  # left padding
    mask = allowed[None, None]
    got = dense.dense_attention(MODULE, query, key, value, mask, 0.25, "sdpa")
    want = eager_attention(MODULE, query, key, value, torch.zeros(1, 1, 9, 40).masked_fill(
        ~mask, torch.finfo(torch.float32).min), 0.25)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
