"""Attention over a head-wise compressed layer (`head_wise_attention`): the accelerator path
(tiles of `TILE` keys, segment softmax through scatter/index operators) against the CPU loop
over (batch row, kv head), and its launches per decode call (issue 21)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sa_bench.attention.compression import TILE, HeadWise, head_wise_attention  # noqa: E402
from sa_bench.attention.ops import accelerator_paths  # noqa: E402
from sa_bench.perf.counts import device_work  # noqa: E402


def random_store(b: int, hk: int, n: int, d: int, dtype, g: torch.Generator) -> HeadWise:
    """Segments of unequal lengths: one kv head keeps nothing, one everything (n > TILE,
    not a multiple of it), the others random shares."""
    valid = torch.rand(b, hk, n, generator=g) < torch.rand(b, hk, 1, generator=g)
    valid[0, 1] = False
    valid[-1, -1] = True
    keys = torch.randn(b, hk, n, d, generator=g).to(dtype)
    values = torch.randn(b, hk, n, d, generator=g).to(dtype)
    return HeadWise.of(keys, values, valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q", "m"), [(1, 1), (1, 6), (5, 9), (4, 0)])
def test_accelerator_path_equals_the_loop(dtype, q, m):
    """Batch 2, 3 queries per kv head; decode (q = 1) and a question pass (q > 1) with keys
    appended after compression (causal, bottom-right), and none appended (m = 0)."""
    g = torch.Generator().manual_seed(q * 10 + m)
    b, hk, groups, d, n = 2, 4, 3, 32, 150
    store = random_store(b, hk, n, d, dtype, g)
    assert 0 in store.counts and n in store.counts and n % TILE
    # as a model passes it: [b, H, q, d] transposed from [b, q, H, d]
    query = torch.randn(b, q, hk * groups, d, generator=g).to(dtype).transpose(1, 2)
    key = torch.randn(b, hk, m, d, generator=g).to(dtype)
    value = torch.randn(b, hk, m, d, generator=g).to(dtype)
    loop = head_wise_attention(query, key, value, store, d**-0.5)
    with accelerator_paths():
        tiles = head_wise_attention(query, key, value, store, d**-0.5)
    assert tiles.shape == loop.shape == (b, q, hk * groups, d) and tiles.dtype == dtype
    # bfloat16: the loop rounds its scores to bfloat16 before the softmax, the tiles do not
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tiles, loop, rtol=tol, atol=tol)
    if m == 0:  # the kv head that kept nothing and has no new key: a zero output, as the loop
        assert not tiles[0, :, groups:2 * groups].any()


def decode_launches(hk: int) -> tuple[int, int]:
    g = torch.Generator().manual_seed(hk)
    h, d = 32, 128
    store = random_store(1, hk, 4096, d, torch.float32, g)
    query = torch.randn(1, 1, h, d, generator=g).transpose(1, 2)
    key, value = torch.randn(1, hk, 3, d, generator=g), torch.randn(1, hk, 3, d, generator=g)
    with device_work() as work:
        head_wise_attention(query, key, value, store, d**-0.5)
    return work.launches, work.syncs


def test_decode_launches_do_not_grow_with_the_kv_heads():
    """One decode call at 32 query heads, d 128: 34 launches and no sync whether the layer has
    8 or 4 kv heads (the loop: 92 at 8)."""
    assert decode_launches(8) == decode_launches(4) == (34, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_slack_path_equals_the_loop_step_by_step_and_after_a_rewind(dtype):
    """A store with slack: a question pass (q = 4), then decode steps, each call's new keys
    written into every segment's slack, equals the loop (a store without slack) at every step;
    a rewound cache (shorter appended keys, other values) is attended as the new keys say;
    appended keys beyond the slack fall back to the loop."""
    g = torch.Generator().manual_seed(7)
    b, hk, groups, d, n, slack = 2, 4, 3, 32, 150, 6
    valid = torch.rand(b, hk, n, generator=g) < torch.rand(b, hk, 1, generator=g)
    valid[0, 1] = False  # a kv head that kept nothing
    keys = torch.randn(b, hk, n, d, generator=g).to(dtype)
    values = torch.randn(b, hk, n, d, generator=g).to(dtype)
    plain, roomy = HeadWise.of(keys, values, valid), HeadWise.of(keys, values, valid, slack)
    assert roomy.slack == slack and roomy.keys.shape[0] > plain.keys.shape[0]
    assert roomy.nbytes - plain.nbytes < b * hk * TILE * d * 2 * keys.element_size()
    appended = torch.randn(b, hk, slack + 1, d, generator=g).to(dtype)
    appended_v = torch.randn(b, hk, slack + 1, d, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def step(m: int, q: int, key: torch.Tensor, value: torch.Tensor) -> None:
        query = torch.randn(b, q, hk * groups, d, generator=g).to(dtype).transpose(1, 2)
        want = head_wise_attention(query, key[:, :, :m], value[:, :, :m], plain, d**-0.5)
        got = head_wise_attention(query, key[:, :, :m], value[:, :, :m], roomy, d**-0.5)
        assert got.shape == want.shape == (b, q, hk * groups, d)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    step(4, 4, appended, appended_v)  # the question: 4 new keys, causal among themselves
    for m in (5, 6):
        step(m, 1, appended, appended_v)
    start = roomy.offsets[2] + roomy.counts[2]
    assert torch.equal(roomy.keys[start:start + slack], appended[0, 2, :slack])  # written in place
    rewound, rewound_v = appended.flip(2), appended_v.flip(2)  # the next answer, other tokens
    step(2, 2, rewound, rewound_v)
    step(3, 1, rewound, rewound_v)
    step(slack + 1, 1, appended, appended_v)  # past the slack: the loop
