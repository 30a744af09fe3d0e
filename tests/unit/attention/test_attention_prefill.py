"""Sparse prefill: the kernels against brute-force masked attention, the density count, chunked
estimation, full density == dense, and a prefill + decode job end to end."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


from sa_bench import runner  # noqa: E402
from sa_bench.attention import SparseMethod, prefill  # noqa: E402
from sa_bench.attention.prefill import (  # noqa: E402
    Pattern,
    attend,
    attend_flex,
    attend_gather,
    attend_reference,
    causal_pairs,
    check_kernel,
    computed_pairs,
    flashinfer_available,
    flashinfer_bsr,
    flashinfer_diagonal,
)
from sa_bench.attention.prefill_methods import (  # noqa: E402
    AShape,
    BlockSparse,
    FlexPrefill,
    FlexPrefillBytedance,
    TriShape,
    VerticalSlash,
    XAttention,
)
from sa_bench.config import ConfigError  # noqa: E402
from sa_bench.models.forward import with_cache  # noqa: E402
from sa_bench.runner import _prefill  # noqa: E402
from tests.conftest import run_sa_bench  # noqa: E402
from tests.unit.attention.test_attention_hook import make  # noqa: E402

# small settings that are really sparse at a few hundred tokens
METHODS = {
    "vertical_slash": {"_target_": "sa_bench.attention.prefill_methods.VerticalSlash",
                       "vertical_size": 24, "slash_size": 16, "last_q": 32, "keep_last": 4, "block": 16},
    "a_shape": {"_target_": "sa_bench.attention.prefill_methods.AShape", "n_init": 8, "n_local": 48,
                "block": 16},
    "tri_shape": {"_target_": "sa_bench.attention.prefill_methods.TriShape", "n_init": 8,
                  "n_local": 48, "n_last": 20, "block": 16},
    "block_sparse": {"_target_": "sa_bench.attention.prefill_methods.BlockSparse", "block": 16, "top_k": 4},
    "xattention": {"_target_": "sa_bench.attention.prefill_methods.XAttention", "stride": 4,
                   "threshold": 0.6, "block": 32},
    "flexprefill": {"_target_": "sa_bench.attention.prefill_methods.FlexPrefill", "alpha": 0.05,
                    "approximation": 32, "min_budget": 4, "keep_last": 4, "block": 16},
    "flexprefill_bytedance": {"_target_": "sa_bench.attention.prefill_methods.FlexPrefillBytedance",
                              "gamma": 0.9, "tau": 0.15, "min_budget": 16, "block": 16},
}
FULL = {  # settings that compute every causal pair
    "vertical_slash": {**METHODS["vertical_slash"], "vertical_size": 4096, "slash_size": 4096},
    "a_shape": {**METHODS["a_shape"], "n_local": 4096},
    "block_sparse": {**METHODS["block_sparse"], "top_k": 4096},
    "flexprefill": {**METHODS["flexprefill"], "min_budget": 4096},
    "flexprefill_bytedance": {**METHODS["flexprefill_bytedance"], "min_budget": 4096},  # dense fallback
}


def brute_force_mask(pattern: Pattern, query, key):
    """bool [b, H, q, kv]: the (query, key) pairs the pattern computes (blocks, columns, causal)."""
    b, h, q, _ = query.shape
    kv = key.shape[2]
    pos, keys = torch.arange(kv - q, kv), torch.arange(kv)
    allowed = pattern.blocks[:, :, pos // pattern.block - pattern.first_block][..., keys // pattern.block]
    if pattern.columns is not None:
        width = max(kv, int(pattern.columns.max()) + 1)  # a position >= kv: an unused slot
        cols = torch.zeros(b, h, width, dtype=torch.bool).scatter_(-1, pattern.columns, True)[..., :kv]
        allowed = allowed | cols[:, :, None, :]
    return allowed & (keys[None, :] <= pos[:, None])


def brute_force(pattern: Pattern, query, key, value, scaling):
    """Masked dense attention over the pattern's pairs, and the pairs per head."""
    h = query.shape[1]
    allowed = brute_force_mask(pattern, query, key)
    g = h // key.shape[1]
    s = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return p @ value.repeat_interleave(g, 1), allowed.sum((-1, -2)).double()


def random_pattern(b, h, start, kv, block, columns, gen):
    first, nk = start // block, -(-kv // block)
    blocks = torch.rand(b, h, nk - first, nk, generator=gen) < 0.3
    cols = torch.rand(b, h, kv, generator=gen).argsort(-1)[..., :columns] if columns else None
    return Pattern(block, start, blocks, cols)


def qkv(b, h, hk, q, kv, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q, d, generator=gen), torch.randn(b, hk, kv, d, generator=gen),
            torch.randn(b, hk, kv, d, generator=gen))


@pytest.mark.parametrize("start,kv,block,columns", [
    (0, 203, 16, 0), (0, 203, 16, 7), (77, 203, 16, 7), (64, 300, 32, 0), (150, 151, 16, 3)])
def test_reference_kernel_equals_masked_dense_attention(start, kv, block, columns):
    gen = torch.Generator().manual_seed(kv + start)
    query, key, value = qkv(2, 4, 2, kv - start, kv)
    pattern = random_pattern(2, 4, start, kv, block, columns, gen)
    out, _ = attend_reference(pattern, query, key, value, 0.3)
    ref, pairs = brute_force(pattern, query, key, value, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the CPU kernel (fused SDPA per head group, LSE merge): also heads with no key at all
    torch.testing.assert_close(attend_gather(pattern, query, key, value, 0.3), ref, atol=1e-5, rtol=1e-5)
    for slack, group in ((0.0, 1), (1.0, 3)):  # every head alone / groups padded to their maximum
        torch.testing.assert_close(attend_gather(pattern, query, key, value, 0.3, slack, group), ref,
                                   atol=1e-5, rtol=1e-5)
    # one query block per call / every query block in one call / groups cut by the key budget
    # columns once per query block / for every row at once
    for rows, key_rows, column_rows in ((1, 1 << 17, 1), (4096, 1 << 17, 4096), (64, 3 * block, 256)):
        out = attend_gather(pattern, query, key, value, 0.3, rows=rows, key_rows=key_rows,
                            column_rows=column_rows)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(computed_pairs(pattern, kv), pairs)
    assert causal_pairs(start, kv) == int(torch.ones(kv, kv).tril()[start:].sum())


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("start", [0, 70])
def test_method_patterns_run_exactly_and_sparsely(name, start):
    kv = 333
    query, key, value = qkv(1, 4, 2, kv - start, kv, seed=start)
    method = SparseMethod.from_config({"name": name, "prefill": METHODS[name]}).prefill
    pattern = method.pattern(query, key, start)
    ref, pairs = brute_force(pattern, query, key, value, 0.25)
    for kernel in ("reference", "gather", "auto"):
        out = attend(pattern, query, key, value, 0.25, kernel)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    density = float(pairs.sum() / (4 * causal_pairs(start, kv)))
    assert 0.05 < density < 0.9, density


def test_method_specific_choices():
    kv = 320
    query, key, _ = qkv(1, 4, 2, kv, kv, seed=3)
    vs = VerticalSlash(vertical_size=24, slash_size=16, last_q=32, keep_first=4, keep_last=4, block=16)
    columns, offsets = vs.estimate(query, key, 0)
    assert columns.shape == (1, 4, 24) and offsets.shape == (1, 4, 16)
    assert all(set(range(4)) <= set(c.tolist()) for c in columns[0])  # first columns kept
    assert all(set(range(4)) <= set(o.tolist()) for o in offsets[0])  # nearest diagonals kept
    pattern = vs.pattern(query, key, 0)
    nq = pattern.blocks.shape[-2]
    assert pattern.blocks[..., torch.arange(nq), torch.arange(nq)].all()  # offset 0: own block
    bs = BlockSparse(block=16, top_k=5).pattern(query, key, 0)
    assert (bs.blocks.sum(-1) <= 5).all() and bs.blocks[..., 0].all()
    assert bs.blocks[..., torch.arange(nq), torch.arange(nq)].all()
    xa = XAttention(stride=4, threshold=0.5, block=32)
    scores = xa.block_scores(query, key, 0)
    torch.testing.assert_close(scores.sum(-1), torch.full(scores.shape[:-1], 32 / 4.0))  # softmax rows
    blocks = xa.pattern(query, key, 0).blocks
    assert blocks[..., 0].all()
    assert blocks[..., torch.arange(10), torch.arange(10)].all()
    kept = (scores * blocks).sum(-1) / scores.sum(-1)
    more = XAttention(stride=4, threshold=0.9, block=32).pattern(query, key, 0).blocks
    assert (more.sum(-1) >= blocks.sum(-1)).all() and (more.sum() > blocks.sum())
    assert (kept > 0).all()
    tri = TriShape(n_init=8, n_local=48, n_last=20, block=16).pattern(query, key, 0).blocks
    a = AShape(n_init=8, n_local=48, block=16).pattern(query, key, 0).blocks
    assert torch.equal(tri[..., :-2, :], a[..., :-2, :]) and tri[..., -1, :].all()


def prefill_logits(model, method, ids, chunk):
    with method.installed(model, "sdpa"):
        method.reset()
        cache, _, _ = _prefill(model, method, tuple(ids), torch.device("cpu"), chunk)
        with torch.inference_mode():
            method.set_phase("question")
            logits = model(input_ids=torch.tensor([[5, 6, 7]]), **with_cache(model, cache)).logits
    return cache, logits


@pytest.mark.parametrize("name", sorted(FULL))
@pytest.mark.parametrize("chunk", [None, 96])
def test_full_density_settings_give_the_dense_prefill(name, chunk):
    model = make()[0]
    ids = torch.randint(0, 300, (250,), generator=torch.Generator().manual_seed(1)).tolist()
    dense = SparseMethod.from_config({"name": "dense"})
    sparse = SparseMethod.from_config({"name": name, "prefill": FULL[name]})
    cache_d, logits_d = prefill_logits(model, dense, ids, chunk)
    cache_s, logits_s = prefill_logits(model, sparse, ids, chunk)
    for layer in range(2):
        torch.testing.assert_close(cache_s.layers[layer].keys, cache_d.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache_s.layers[layer].values, cache_d.layers[layer].values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_s, logits_d, atol=1e-4, rtol=1e-4)
    stats = sparse.stats()
    assert stats["density"]["prefill"] == [1.0, 1.0]
    assert stats["density"]["question"] == [1.0, 1.0]  # phase question: the prefill method
    assert stats["prefill_estimated_on"] == ("prompt" if chunk is None else "chunk")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_chunked_estimation_never_reads_a_later_query(name):
    """Two prompts that share their first two chunks: the patterns and outputs of those chunks
    are the same whatever follows (and one pass estimates differently)."""
    model = make()[0]
    gen = torch.Generator().manual_seed(2)
    head = torch.randint(0, 300, (192,), generator=gen).tolist()
    tails = [torch.randint(0, 300, (100,), generator=gen).tolist() for _ in range(2)]
    runs = []
    for tail in tails:
        method = SparseMethod.from_config({"name": name, "prefill": METHODS[name]})
        seen = []
        estimate = method.prefill.pattern

        def record(query, key, start, estimate=estimate, seen=seen):
            pattern = estimate(query, key, start)
            seen.append((start, pattern.blocks.clone(),
                         None if pattern.columns is None else pattern.columns.clone()))
            return pattern

        method.prefill.pattern = record
        cache, _ = prefill_logits(model, method, head + tail, 96)
        runs.append((seen, cache.layers[0].keys.clone(), cache.layers[1].keys.clone()))
    (a, a0, a1), (b, b0, b1) = runs
    early = [i for i, entry in enumerate(a) if entry[0] < 192]
    assert len(early) == 4 and a[len(early)][0] == 192  # two chunks x two layers, then later
    for i in early:
        assert a[i][0] == b[i][0] and torch.equal(a[i][1], b[i][1])
        assert (a[i][2] is None) == (b[i][2] is None)
        if a[i][2] is not None:
            assert torch.equal(a[i][2], b[i][2])
    assert torch.equal(a0[:, :, :192], b0[:, :, :192]) and torch.equal(a1[:, :, :192], b1[:, :, :192])
    assert not torch.equal(a1[:, :, 192:], b1[:, :, 192:])


def test_config_errors_name_the_prefill_key():
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.top_k: expected a value >= 3"):
        SparseMethod.from_config({"name": "x", "prefill": {**METHODS["block_sparse"], "top_k": 1}})
    with pytest.raises(ConfigError, match=r"sparse\.prefill\._target_: .* not a PrefillMethod"):
        SparseMethod.from_config({"name": "x", "prefill": {"_target_": "sa_bench.attention.maskers.Sink"}})
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.max_budget: expected a value >= 1, got 0"):
        SparseMethod.from_config({"name": "x", "prefill": {**METHODS["flexprefill_bytedance"], "max_budget": 0}})
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.gamma: expected a value > 0.0"):
        SparseMethod.from_config({"name": "x", "prefill": {**METHODS["flexprefill_bytedance"], "gamma": 0.0}})
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.block: expected a multiple of stride"):
        SparseMethod.from_config({"name": "x", "prefill": {**METHODS["xattention"], "block": 30}})


def test_flex_attention_block_mask_equals_masked_dense_on_cpu():
    """FlexAttention compiled with inductor's C++ backend (one compile, ~20 s here)."""
    gen = torch.Generator().manual_seed(5)
    query, key, value = qkv(1, 4, 2, 130, 250)
    pattern = random_pattern(1, 4, 120, 250, 32, 0, gen)
    out = attend_flex(pattern, query, key, value, 0.3)
    ref, _ = brute_force(pattern, query, key, value, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_attention_with_columns_on_gpu():
    gen = torch.Generator().manual_seed(6)
    query, key, value = (t.cuda() for t in qkv(1, 4, 2, 300, 700))
    pattern = random_pattern(1, 4, 400, 700, 64, 20, gen)
    pattern = Pattern(64, 400, pattern.blocks.cuda(), pattern.columns.cuda())
    out = attend_flex(pattern, query, key, value, 0.3)
    ref, _ = attend_reference(pattern, query, key, value, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def expand_bsr(indptr, indices, mask, m, n, block):
    """A BSR matrix of block x block blocks (FlashInfer's plan arguments; `mask` [nnz, block,
    block] or None: full blocks) as the dense bool [m, n] of the pairs it computes; a block
    listed twice in a row fails."""
    dense = torch.zeros(m, n, dtype=torch.bool)
    for row in range(len(indptr) - 1):
        cols = indices[int(indptr[row]):int(indptr[row + 1])].tolist()
        assert len(set(cols)) == len(cols)
        for n_, j in enumerate(cols, int(indptr[row])):
            dense[row * block:(row + 1) * block, j * block:(j + 1) * block] = (
                True if mask is None else mask[n_])
    return dense


def flashinfer_coverage(blocks, h, hk, start, kv, block):
    """The pairs `attend_flashinfer`'s two calls compute for one batch row, read from their plan
    arguments as the kernel reads them: (blocks call, diagonal call), bool [H, q, kv] each over
    the chunk's rows, and whether a real row reads a padded key (>= kv)."""
    nq, nk = blocks.shape[-2:]
    first, g = start // block, h // hk
    indptr, indices, diag = flashinfer_bsr(blocks, first, hk)
    assert indptr.dtype == indices.dtype == torch.int32 and int(indptr[-1]) == len(indices)
    off = expand_bsr(indptr, indices, None, h * nq * block, hk * nk * block, block)
    off = off.view(h, nq * block, hk, nk * block)
    for hi in range(h):  # only the query head's own kv head
        assert not off[hi, :, [x for x in range(hk) if x != hi // g]].any()
    off = off[torch.arange(h), :, torch.arange(h) // g]  # [H, nq * block, nk * block]
    d_indptr, d_indices, d_mask = flashinfer_diagonal(nq, block, blocks.device)
    own = expand_bsr(d_indptr, d_indices, d_mask, nq * block, nq * block, block)
    dia = torch.zeros(h, nq * block, nk * block, dtype=torch.bool)
    dia[:, :, first * block:] = own & diag.repeat_interleave(block, -1)[..., None]
    front = start - first * block
    rows = slice(front, front + kv - start)
    padded = bool((off | dia)[:, rows, kv:].any())
    return off[:, rows, :kv], dia[:, rows, :kv], padded


@pytest.mark.parametrize("h,hk,start,kv,block", [
    (4, 2, 0, 203, 16), (4, 4, 77, 203, 16), (6, 2, 64, 300, 32), (6, 2, 77, 300, 32),
    (2, 1, 150, 151, 16), (3, 3, 5, 40, 8), (6, 3, 190, 203, 16), (4, 4, 0, 64, 16)])
def test_flashinfer_calls_compute_the_causal_pattern(h, hk, start, kv, block):
    """The blocks call (no element mask) and the diagonal call (causal mask) expand to disjoint
    sets of pairs whose union is exactly what the reference computes (pattern and causal),
    per head, for chunked starts on and off the grid, lengths off the grid and GQA 1/2/3."""
    gen = torch.Generator().manual_seed(kv + start + h)
    pattern = random_pattern(2, h, start, kv, block, 0, gen)
    pattern.blocks[1] = True  # every block: each query block's diagonal is cut
    query, key, _ = qkv(2, h, hk, kv - start, kv)
    allowed = brute_force_mask(pattern, query, key)
    for bi in range(2):
        off, dia, padded = flashinfer_coverage(pattern.blocks[bi], h, hk, start, kv, block)
        assert not padded and not (off & dia).any()
        assert torch.equal(off | dia, allowed[bi])


@pytest.mark.parametrize("h,hk,start,kv,block", [
    (32, 8, 0, 4096, 64), (32, 8, 1000, 4096, 64), (8, 8, 4050, 4096, 16)])
def test_flashinfer_element_mask_is_one_block_per_query_block(h, hk, start, kv, block):
    """Mask memory: only the diagonal call has an element mask, one block per query block (at
    most the (head, query block) pairs; one stored block, expanded), however dense the
    pattern; the blocks call's blocks, which grow with density, have none."""
    nq, nk = -(-kv // block) - start // block, -(-kv // block)
    blocks = torch.ones(h, nq, nk, dtype=torch.bool)
    indptr, indices, diag = flashinfer_bsr(blocks, start // block, hk)
    _, _, mask = flashinfer_diagonal(nq, block, blocks.device)
    assert mask.shape[1:] == (block, block) and len(mask) == nq <= diag.numel()  # (head, q block)
    assert mask.untyped_storage().nbytes() == block * block
    assert diag.all() and len(indices) == h * (nq * (nq - 1) // 2 + nq * (nk - nq))


class FakeBlockSparseWrapper:
    """FlashInfer's `BlockSparseAttentionWrapper` as its docs define plan/run (R x C blocks of
    a BSR matrix shared by all heads, optional `mask` [nnz, R, C], q [M, heads, d], k/v [N,
    kv heads, d], GQA, lse base 2), densely in float32; a row with no key gets nan, as an
    unwritten output could hold anything."""

    def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, *,
             mask=None, sm_scale, q_data_type, kv_data_type, o_data_type):
        assert R == C and M % R == 0 and N % C == 0 and num_qo_heads % num_kv_heads == 0
        assert q_data_type == kv_data_type == o_data_type
        self.allowed = expand_bsr(indptr, indices, mask, M, N, R)
        self.g, self.scale, self.dtype = num_qo_heads // num_kv_heads, sm_scale, o_data_type
        self.calls = getattr(self, "calls", 0) + 1

    def run(self, q, k, v, return_lse):
        k, v = (t.float().repeat_interleave(self.g, 1).transpose(0, 1) for t in (k, v))
        s = (q.float().transpose(0, 1) @ k.transpose(-1, -2) * self.scale).masked_fill(
            ~self.allowed, float("-inf"))  # [heads, M, N]
        lse = torch.logsumexp(s, -1)
        out = torch.exp(s - lse[..., None]) @ v  # nan where a row has no key
        return out.transpose(0, 1).to(self.dtype), (lse / math.log(2)).T


@pytest.mark.parametrize("h,hk,start,kv,block,columns", [
    (4, 2, 0, 203, 16, 0), (4, 2, 77, 203, 16, 7), (6, 2, 64, 300, 32, 5), (3, 3, 190, 203, 16, 0),
    (6, 2, 77, 300, 32, 0)])
def test_flashinfer_call_on_a_fake_wrapper_equals_the_reference(monkeypatch, h, hk, start, kv,
                                                                block, columns):
    """The padding, head layouts, the two calls' merge, lse base, rows without a key and the
    column merge around FlashInfer, with it replaced by `FakeBlockSparseWrapper` (no GPU here)."""
    fake = FakeBlockSparseWrapper()
    monkeypatch.setattr(prefill, "_flashinfer_wrapper", lambda device: fake)
    gen = torch.Generator().manual_seed(kv + start)
    query, key, value = (t.to(torch.bfloat16) for t in qkv(2, h, hk, kv - start, kv))
    pattern = random_pattern(2, h, start, kv, block, columns, gen)
    pattern.blocks[0, 1, :3] = False  # rows with no key (unless a column)
    nq, nk = pattern.blocks.shape[-2:]
    diagonal = torch.arange(nk)[None, :] == torch.arange(nq)[:, None] + start // block
    pattern.blocks[0, 2] = diagonal  # the diagonal call only
    pattern.blocks[1, 0] &= ~diagonal  # the blocks call only
    out = attend(pattern, query, key, value, 0.3, kernel="flashinfer")
    ref, _ = attend_reference(pattern, query, key, value, 0.3)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    assert fake.calls == 4  # two per batch row


def test_flashinfer_kernel_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    if flashinfer_available():
        check_kernel("flashinfer", True, "bfloat16", "k")
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.kernel: flashinfer runs on CUDA only"):
        check_kernel("flashinfer", False, "auto", "sparse.prefill.kernel")
    with pytest.raises(ConfigError, match=r"kernel: flashinfer needs model.dtype float16 or bfloat16"):
        check_kernel("flashinfer", True, "float32", "sparse.prefill.kernel")
    if not flashinfer_available():
        with pytest.raises(ConfigError, match=r"sparse\.prefill\.kernel: flashinfer is not installed"):
            check_kernel("flashinfer", True, "auto", "sparse.prefill.kernel")
    for kernel in ("auto", "gather", "reference", "flex"):
        check_kernel(kernel, False, "float32", "k")
    method = SparseMethod.from_config({"name": "x", "prefill": {**METHODS["block_sparse"], "kernel": "flashinfer"}})
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.kernel: expected one of \[.*'flashinfer'\]"):
        SparseMethod.from_config({"name": "x", "prefill": {**METHODS["block_sparse"], "kernel": "flashinfr"}})
    import sa_bench.models.loading as loading
    monkeypatch.setattr(loading, "load_tokenizer", lambda model: pytest.fail("loaded the tokenizer"))
    monkeypatch.setattr(loading, "load_model", lambda model, devices: pytest.fail("loaded the model"))
    spec = SimpleNamespace(seed=0, model=SimpleNamespace(source=lambda: "embedded", dtype="auto"),
                           benchmark=None, sparse=method)
    with pytest.raises(ConfigError, match="flashinfer runs on CUDA only"):
        runner.evaluate(spec, tmp_path, SimpleNamespace(torch_devices=[]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flashinfer_kernel_equals_the_reference_on_gpu(dtype):
    if not flashinfer_available():
        pytest.skip("flashinfer is not importable here")
    dtype = getattr(torch, dtype)
    for start, kv, block, columns in ((0, 700, 64, 0), (400, 700, 64, 20), (77, 203, 16, 7)):
        gen = torch.Generator().manual_seed(kv + start)
        query, key, value = (t.cuda().to(dtype) for t in qkv(2, 8, 2, kv - start, kv, d=64))
        pattern = random_pattern(2, 8, start, kv, block, columns, gen)
        pattern = Pattern(block, start, pattern.blocks.cuda(),
                          None if pattern.columns is None else pattern.columns.cuda())
        out = attend(pattern, query, key, value, 0.125, kernel="flashinfer")
        ref, _ = attend_reference(pattern, query, key, value, 0.125)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.e2e  # starts `python -m sa_bench` in a subprocess
def test_prefill_and_decode_methods_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    run_sa_bench("sparse=vertical_slash_quest", "benchmark.n_samples=2", "model.prefill_chunk=512",
                 "sparse.prefill.vertical_size=32", "sparse.prefill.slash_size=32",
                 "sparse.prefill.last_q=64", "sparse.prefill.keep_last=16", "sparse.prefill.block=16",
                 root=out, check=True)
    stats_files = sorted(out.glob("tiny/vertical_slash_quest/passkey/*/*/stats.json"))
    assert len(stats_files) == 2
    for path in stats_files:
        attention = json.loads(path.read_text())["attention"]
        density = attention["density"]
        assert all(0.05 < d < 0.5 for d in density["prefill"]), density
        assert all(0 < d < 0.5 for d in density["decode"]), density
        assert density["question"] == [1.0, 1.0]  # phase: decode
        assert attention["prefill_estimated_on"] == "chunk"
        heads = attention["prefill_density_per_head"]
        assert len(heads) == 2 and all(len(row) == 4 and all(0 < d < 1 for d in row) for row in heads)
        assert (path.parent / "done.json").exists()


def test_flexprefill_sizes_adapt_per_head():
    kv = 300
    query, key, value = qkv(1, 4, 2, kv, kv, seed=5)
    query[:, 0] *= 8  # a peaked head needs fewer columns to cover alpha than a flat one
    fp = FlexPrefill(alpha=0.5, approximation=32, min_budget=2, keep_first=4, keep_last=4, block=16)
    columns, offsets = fp.estimate(query, key, 0)
    used = (columns < kv).sum(-1)[0]
    assert used.min() < used.max() and used.min() >= 4
    for hd in range(4):
        c = columns[0, hd][columns[0, hd] < kv]
        assert set(range(4)) <= set(c.tolist()) and len(set(c.tolist())) == len(c)
        assert set(range(4)) <= set(offsets[0, hd].tolist())
    # the cover count of one head by hand: scores of the last 32 queries, mean over rows
    s = (query[0, 1, -32:] @ key[0, 0].T / 16 ** 0.5).masked_fill(
        torch.arange(kv)[None, :] > torch.arange(kv - 32, kv)[:, None], float("-inf")).softmax(-1)
    sorted_mean = s.mean(0).sort(descending=True).values.cumsum(0)
    assert int(used[1]) == max(2, int((sorted_mean <= 0.5).sum()) + 1)
    pattern = fp.pattern(query, key, 0)
    out = attend(pattern, query, key, value, 0.25)
    ref, pairs = brute_force(pattern, query, key, value, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(computed_pairs(pattern, kv), pairs)


def test_flexprefill_bytedance_heads_budgets_and_chunks():
    """Query-aware heads (tau) take the minimum vertical-slash budget plus their pooled blocks,
    the others the cover counts of the last block's attention; max_budget caps; short prompts
    are dense; a chunk estimated from the same last queries has one pass's blocks."""
    kv, block = 300, 16
    query, key, value = qkv(1, 4, 2, kv, kv, seed=5)
    query[:, 0] *= 8
    none = FlexPrefillBytedance(gamma=0.9, tau=0.0, min_budget=16, block=block)
    columns, diagonals, aware, divergence = none.estimate(query, key, 0)
    assert not aware.any() and (divergence > 0).all()
    nq = -(-kv // block)
    # the cover count of head 1 by hand: the last 16 queries' softmax, mean over rows
    s = (query[0, 1, -16:] @ key[0, 0].T / 16 ** 0.5).masked_fill(
        torch.arange(kv)[None, :] > torch.arange(kv - 16, kv)[:, None], float("-inf")).softmax(-1)
    covering = int((s.mean(0).sort(descending=True).values.cumsum(0) <= 0.9).sum()) + 1
    assert int(columns[0, 1].sum()) == max(1, covering // 128 + 1)
    assert columns[..., 0].all() and diagonals[..., 0].all()  # key block 0, the main diagonal
    blocks = none.pattern(query, key, 0).blocks
    assert blocks[..., 0].all() and blocks[..., torch.arange(nq), torch.arange(nq)].all()
    expected = (columns[:, :, None, :] | diagonals[:, :, (torch.arange(nq)[:, None] - torch.arange(nq)).clamp(min=0)])
    assert torch.equal(blocks, expected & torch.ones(nq, nq, dtype=torch.bool).tril())

    every = FlexPrefillBytedance(gamma=0.9, tau=1.0, min_budget=16, block=block)
    columns, diagonals, aware, _ = every.estimate(query, key, 0)
    assert aware.all() and (columns.sum(-1) == 1).all() and (diagonals.sum(-1) == 1).all()
    blocks = every.pattern(query, key, 0).blocks
    assert (blocks.sum((-1, -2)) > 2 * nq).all()  # more than key block 0 and the diagonal
    pattern = every.pattern(query, key, 0)
    torch.testing.assert_close(attend(pattern, query, key, value, 0.25),
                               brute_force(pattern, query, key, value, 0.25)[0], atol=1e-5, rtol=1e-5)

    capped = FlexPrefillBytedance(gamma=0.99, tau=0.0, min_budget=16, max_budget=32, block=block)
    columns, diagonals, _, _ = capped.estimate(query, key, 0)
    assert (columns.sum(-1) <= 2).all() and (diagonals.sum(-1) <= 2).all()

    assert none.is_dense(32) and not none.is_dense(33)  # max(2 blocks, min_budget)
    short = none.pattern(query[:, :, :32], key[:, :, :32], 0).blocks
    assert torch.equal(short, torch.ones(1, 4, 2, 2, dtype=torch.bool).tril())

    start = 100  # mid-block: the chunk's last queries are one pass's, so are its blocks
    chunk = none.pattern(query[:, :, start:], key, start)
    assert torch.equal(chunk.blocks, none.pattern(query, key, 0).blocks[:, :, start // block:])


@pytest.mark.gpu
def test_flexprefill_bytedance_pattern_on_gpu_equals_cpu():
    query, key, _ = qkv(1, 4, 2, 300, 300, seed=5)
    method = FlexPrefillBytedance(gamma=0.9, tau=0.15, min_budget=16, block=16)
    for start in (0, 100):
        cpu = method.pattern(query[:, :, start:], key, start).blocks
        gpu = method.pattern(query[:, :, start:].cuda(), key.cuda(), start).blocks
        assert torch.equal(cpu, gpu.cpu())


def best_pattern_file(tmp_path, layers):
    file = tmp_path / "best_pattern.json"
    file.write_text(json.dumps(layers))
    return str(file)


def test_vertical_slash_per_head_patterns_from_a_minference_file(tmp_path):
    """MInference's best_pattern format: per layer and query head [type, vertical, slash,
    score]; heads it names use its sizes (stream_llm: first columns + nearest diagonals), the
    others the config's; checked against the model's layers and heads."""
    vs = {**METHODS["vertical_slash"], "keep_first": 2}
    layers = [{"0": ["vertical_and_slash", 5, 8, 0.9], "3": ["stream_llm", 3, 20, 0.5]},
              {"1": ["vertical_and_slash", 40, 30, 0.8]}]
    method = SparseMethod.from_config({"name": "vs", "prefill": {**vs, "patterns": best_pattern_file(tmp_path, layers)}})
    model = make()[0]
    query, key, _ = qkv(1, 4, 2, 200, 200, seed=5)
    prefill = method.prefill
    columns, offsets = prefill.estimate(query, key, 0, layer=0)
    used = [(c < 200).sum().item() for c in columns[0]]
    assert used == [5, 24, 24, 3]
    assert set(columns[0, 3, :3].tolist()) == {0, 1, 2}
    assert set(offsets[0, 3].tolist()) == set(range(20))
    assert [len(set(o.tolist())) for o in offsets[0]] == [8, 16, 16, 20]
    columns, offsets = prefill.estimate(query, key, 0, layer=1)
    assert [(c < 200).sum().item() for c in columns[0]] == [24, 40, 24, 24]
    plain, _ = VerticalSlash(**{k: v for k, v in vs.items() if k != "_target_"}).estimate(query, key, 0)
    assert set(columns[0, 0].tolist()) - {200} == set(plain[0, 0].tolist())
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    prefill_logits(model, method, ids, 64)  # runs per layer through layer_pattern
    heads = method.stats()["prefill_density_per_head"]
    assert heads[0] != heads[1]


def test_best_pattern_file_errors(tmp_path):
    vs = METHODS["vertical_slash"]

    def build(layers):
        return SparseMethod.from_config({"name": "vs", "prefill": {**vs, "patterns": best_pattern_file(tmp_path, layers)}})

    with pytest.raises(ConfigError, match=r"patterns: .* pattern type 'block_sparse' is not supported"):
        build([{"0": ["block_sparse", 1, 1, 0.1]}])
    with pytest.raises(ConfigError, match=r"patterns: .* expected \[type, vertical_size"):
        build([{"0": ["vertical_and_slash", 0, 5, 0.1]}])
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.patterns: MInference best_pattern file not found"):
        SparseMethod.from_config({"name": "vs", "prefill": {**vs, "patterns": str(tmp_path / "none.json")}})
    model = make()[0]
    one_layer = build([{"0": ["vertical_and_slash", 5, 8, 0.9]}])
    with pytest.raises(ConfigError, match=r"sparse\.prefill\.patterns: .* has 1 layers, the model 2"):
        one_layer.prefill.prepare(model.config, "sparse.prefill")
    with pytest.raises(ConfigError, match=r"names head 7, the model has 4 query heads"):
        build([{}, {"7": ["vertical_and_slash", 5, 8, 0.9]}]).prefill.prepare(model.config, "sparse.prefill")


@pytest.mark.parametrize("start,kv", [(0, 1000), (384, 1000), (130, 777)])
def test_xattention_scores_the_same_in_causal_tiles(start, kv):
    """XAttention scores a tile of strided query rows against the keys before its end only:
    the block scores and the pattern equal those of one tile over every key."""
    gen = torch.Generator().manual_seed(kv)
    query = torch.randn(1, 4, kv - start, 16, generator=gen)
    key = torch.randn(1, 2, kv, 16, generator=gen)
    method = XAttention(stride=4, threshold=0.5, block=32)
    method.tile_rows = 1 << 20  # one tile: every query row against every key
    whole, whole_pattern = method.block_scores(query, key, start), method.pattern(query, key, start)
    method.tile_rows = 16  # several tiles of 2 query blocks (8 strided rows per block)
    torch.testing.assert_close(method.block_scores(query, key, start), whole, atol=1e-6, rtol=1e-5)
    assert torch.equal(method.pattern(query, key, start).blocks, whole_pattern.blocks)
