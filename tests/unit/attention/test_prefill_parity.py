"""Prefill patterns equal to the reference code's on the same Q and K: fixtures made by running
the reference's own estimation functions (tests/fixtures/prefill/README.md says how)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from sa_bench.attention.prefill import causal_blocks, n_blocks  # noqa: E402
from sa_bench.attention.prefill_methods import (  # noqa: E402
    BlockSparse,
    FlexPrefill,
    FlexPrefillBytedance,
    VerticalSlash,
    XAttention,
)
from tests.conftest import FIXTURES  # noqa: E402

PREFILL = FIXTURES / "prefill"
SPARSE_FRONTIER = torch.load(PREFILL / "sparse_frontier.pt")
CASES = SPARSE_FRONTIER["cases"]


def as_sets(rows) -> list[set[int]]:
    return [set(int(x) for x in row) for row in rows]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['key'].shape[2]}")
def test_vertical_slash_equals_sparse_frontier(case):
    p = case["vertical_slash"]["params"]
    method = VerticalSlash(vertical_size=p["vertical_size"], slash_size=p["slash_size"],
                           last_q=p["last_q"], keep_first=p["topk_vertical_inf"],
                           keep_last=p["topk_slash_inf"], block=16)
    columns, offsets = method.estimate(case["query"], case["key"], 0)
    assert as_sets(columns[0]) == as_sets(case["vertical_slash"]["columns"][0])
    assert as_sets(offsets[0]) == as_sets(case["vertical_slash"]["offsets"][0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['key'].shape[2]}")
def test_flexprefill_equals_sparse_frontier(case):
    p = case["flexprefill"]["params"]
    method = FlexPrefill(alpha=p["alpha"], approximation=p["approximation_size"],
                         min_budget=p["min_budget"], block=16)
    kv = case["key"].shape[2]
    columns, offsets = method.estimate(case["query"], case["key"], 0)
    assert [c - {kv} for c in as_sets(columns[0])] == as_sets(case["flexprefill"]["columns"])
    assert as_sets(offsets[0]) == as_sets(case["flexprefill"]["offsets"])


# --- MInference (microsoft/MInference), XAttention, sparse-frontier's block_sparse ----------

MINFERENCE = torch.load(PREFILL / "minference.pt")
XATTENTION = torch.load(PREFILL / "xattention.pt")
SF_BLOCK = torch.load(PREFILL / "sparse_frontier_block.pt")


def kv_id(case) -> str:
    return f"kv{case['key'].shape[2]}"


def block_sets(pattern_blocks) -> list[list[set[int]]]:
    """bool [H, nq, nk] -> per head and query block the selected key blocks."""
    return [[set(torch.nonzero(row).flatten().tolist()) for row in head] for head in pattern_blocks]


def causal_index_sets(index, n_q: int) -> list[list[set[int]]]:
    """The reference's block index [H, nq (padded), top_k]: per head and real query block its
    causal entries (topk fills rows that have fewer causal blocks with -inf picks)."""
    return [[{int(j) for j in row if int(j) <= i} for i, row in enumerate(head[:n_q])] for head in index]


@pytest.mark.parametrize("case", MINFERENCE["cases"], ids=kv_id)
def test_vertical_slash_equals_minference(case):
    p = case["vertical_slash"]["params"]
    method = VerticalSlash(vertical_size=max(p["vertical_size"], 30), slash_size=max(p["slash_size"], 50),
                           last_q=p["last_q"], keep_first=p["keep_first"], keep_last=p["keep_last"])
    columns, offsets = method.estimate(case["query"], case["key"], 0)
    assert as_sets(columns[0]) == as_sets(case["vertical_slash"]["columns"])
    assert as_sets(offsets[0]) == as_sets(case["vertical_slash"]["offsets"])


@pytest.mark.parametrize("case", MINFERENCE["cases"], ids=kv_id)
@pytest.mark.parametrize("run", [0, 1])
def test_block_sparse_equals_minference(case, run):
    ref = case["block_sparse"][run]
    n = case["key"].shape[2]
    method = BlockSparse(block=ref["params"]["block"], top_k=ref["params"]["top_k"], keep_local=False)
    pattern = method.pattern(case["query"], case["key"], 0)
    assert block_sets(pattern.blocks[0]) == causal_index_sets(ref["blocks"], n_blocks(n, 64))


@pytest.mark.parametrize("case", SF_BLOCK["cases"], ids=kv_id)
@pytest.mark.parametrize("run", [0, 1, 2])
def test_block_sparse_equals_sparse_frontier(case, run):
    ref = case["runs"][run]
    p = ref["params"]
    n = case["key"].shape[2]
    pattern = BlockSparse(block=p["chunk_size"], top_k=p["top_chunks"]).pattern(case["query"], case["key"], 0)
    assert block_sets(pattern.blocks[0]) == causal_index_sets(ref["blocks"], n_blocks(n, p["chunk_size"]))


def xattention_runs():
    return [pytest.param(case, run, id=f"{kv_id(case)}-{run['params']['stride']}-"
                         f"{run['params']['threshold']}-c{run['params']['chunk_size']}")
            for case in XATTENTION["cases"] for run in case["runs"]]


@pytest.mark.parametrize(("case", "run"), xattention_runs())
def test_xattention_equals_reference(case, run):
    """One pass (chunk_size above the length) and the reference's own chunks (each chunk's
    queries against every key before its end) against ours on the same chunks."""
    p = run["params"]
    q, k = case["query"], case["key"]
    n = k.shape[2]
    method = XAttention(stride=p["stride"], threshold=p["threshold"], block=p["block"])
    nb = n_blocks(n, p["block"])
    rows = []
    for start in range(0, n, p["chunk_size"]):
        end = min(n, start + p["chunk_size"])
        blocks = method.pattern(q[:, :, start:end], k[:, :, :end], start).blocks[0]
        rows.append(torch.nn.functional.pad(blocks, (0, nb - blocks.shape[-1])))
        scores = method.block_scores(q[:, :, start:end], k[:, :, :end], start)[0]
        ref_scores = run["block_sums"][:, start // p["block"]:n_blocks(end, p["block"]), :scores.shape[-1]]
        torch.testing.assert_close(scores, ref_scores.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.cat(rows, 1), run["mask"])


@pytest.mark.parametrize("case", MINFERENCE["cases"], ids=kv_id)
def test_best_pattern_file_equals_minference(case, tmp_path):
    """MInference's per-head config file (its format; layer 1 used) read by `patterns`, with
    conf/sparse/minference.yaml's settings: the same columns and diagonals per head."""
    ref = case["best_pattern"]
    file = tmp_path / "best_pattern.json"
    file.write_text(json.dumps(ref["file"]))
    method = VerticalSlash(vertical_size=1000, slash_size=6096, last_q=64, keep_first=30, keep_last=100,
                           patterns=str(file))
    kv = case["key"].shape[2]
    columns, offsets = method.estimate(case["query"], case["key"], 0, layer=ref["layer"])
    assert [c - {kv} for c in as_sets(columns[0])] == as_sets(ref["columns"])
    assert as_sets(offsets[0]) == as_sets(ref["offsets"])
    pattern = method.layer_pattern(case["query"], case["key"], 0, ref["layer"])
    assert torch.equal(pattern.columns, columns)


# --- bytedance/FlexPrefill's own selection ------------------------------------------------

BYTEDANCE = torch.load(PREFILL / "flexprefill_bytedance.pt")


def bytedance_runs():
    """Per fixture case its Q/K (xattention.pt's random ones by index, or the embedded model's
    layer, float16 -> float32 as the reference ran them) and each parameter set."""
    params = []
    for case in BYTEDANCE["cases"]:
        if "source_case" in case:
            qk = XATTENTION["cases"][case["source_case"]]
            where = kv_id(qk)
        else:
            qk = {"query": case["query"].float(), "key": case["key"].float()}
            where = f"embedded-layer{case['embedded_layer']}"
        for run in case["runs"]:
            p = run["params"]
            params.append(pytest.param(qk, run, id=f"{where}-b{p['block']}-g{p['gamma']}-t{p['tau']}-"
                                       f"m{p['min_budget']}-M{p['max_budget']}"))
    return params


@pytest.mark.parametrize(("case", "run"), bytedance_runs())
def test_flexprefill_bytedance_equals_reference(case, run):
    """`flex_prefill_attention`'s choice on the same Q/K: dense for short prompts, else the
    same query-aware heads (square-root JS divergence < tau) and the same blocks per head."""
    p = run["params"]
    method = FlexPrefillBytedance(gamma=p["gamma"], tau=p["tau"], min_budget=p["min_budget"] or 1,
                                  max_budget=p["max_budget"], block=p["block"])
    q, k = case["query"], case["key"]
    n = k.shape[2]
    blocks = method.pattern(q, k, 0).blocks[0]
    if run["dense"]:
        assert method.is_dense(n)
        assert torch.equal(blocks, causal_blocks(0, n, p["block"], "cpu").expand(4, -1, -1))
        return
    _, _, aware, divergence = method.estimate(q, k, 0)
    torch.testing.assert_close(divergence[0], run["js"], rtol=1e-5, atol=1e-6)
    assert torch.equal(aware[0], run["js"] < p["tau"])
    assert torch.equal(blocks, run["blocks"])
